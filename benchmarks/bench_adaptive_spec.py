"""Speculation against AR on text no draft can guess, with SGLang's own benchmark client.

    .venv-sglang/bin/python benchmarks/bench_adaptive_spec.py --model demo

One `fast-dvlm serve` process per configuration (`ar`; `spec` with its default adaptive draft
length; `spec --draft-length 31`, the whole-block rounds spec ran before the adaptive policy;
optionally `spec --draft-length 0`, AR steps through the dLLM path), all up at once, and
`python -m sglang.bench_serving` on its generated-shared-prefix dataset (random-token prompts of
~1.1k tokens: 2 groups x 8 prompts, a 1024-token shared system prompt, 32-token questions, 48
output tokens) at each `--concurrency`, the adaptive-speculation issue's command.

This 2-core machine's speed moves by up to 1.6x between two runs a minute apart, so one run per
configuration cannot settle a 0.95x target. The configurations' runs are interleaved: for each
concurrency, `--repeats` rounds, each running every configuration once (in a rotated order,
the prefix cache flushed before each run so every run starts cold), and the ratio to AR is the
median over rounds of the ratio within a round (runs seconds apart, under the same machine
conditions); `pooled_ratio_to_ar` is the ratio of the configurations' throughputs over all
their runs together (total output tokens / total duration). For spec, `/metrics` gives the tokens per forward and the draft lengths the policy
chose. Writes `benchmarks/results/adaptive_spec_<device>_<model>.json`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from datetime import date
from pathlib import Path

import httpx
from bench_prefix_cache import shared_prefix_load  # same folder: run as benchmarks/bench_adaptive_spec.py

from fast_dvlm_sglang.config import resolve_model_dir
from fast_dvlm_sglang.server_process import ServeProcess

RESULTS = Path(__file__).parent / "results"
# name: (algorithm, `fast-dvlm serve` flags, extra SGLang flags)
CONFIGS = {"ar": ("ar", [], []), "spec": ("spec", [], []), "spec_k31": ("spec", ["--draft-length", "31"], []),
           "spec_k0": ("spec", ["--draft-length", "0"], []),
           # SGLang's AR decode without its overlap scheduler (which every dLLM server runs without)
           "ar_no_overlap": ("ar", [], ["--disable-overlap-schedule"])}
DEFAULT_CONFIGS = ("ar", "spec", "spec_k31")


def _pooled(rows: list[dict], ar_rows: list[dict]) -> float | None:
    """Output tokens over wall time, all of a configuration's runs together, against AR's: every
    repeat weighs by its duration, so one run slowed by the machine does not swing the ratio as
    it swings a ratio of two short runs."""
    def throughput(rs):
        done = [r for r in rs if r.get("duration") and r.get("total_output_tokens")]
        return sum(r["total_output_tokens"] for r in done) / sum(r["duration"] for r in done) if done else None

    ours, ar = throughput(rows), throughput(ar_rows)
    return ours / ar if ours and ar else None


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _metrics(server) -> dict[str, float]:
    """Our `fast_dvlm:spec_*` series (sums over the server's life)."""
    out = {}
    for line in httpx.get(server.base_url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("fast_dvlm:spec_") and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = out.get(name, 0.0) + float(value)
    return out


def _draft_lengths(before: dict, after: dict, series: str = "fast_dvlm:spec_draft_length") -> dict[str, float]:
    """Rounds per draft length bucket (the histogram's cumulative buckets, differenced)."""
    cum = {}
    for name, value in after.items():
        if name.startswith(series + "_bucket"):
            le = name.split('le="', 1)[1].split('"', 1)[0]
            cum[le] = value - before.get(name, 0.0)
    keys = sorted((k for k in cum if k != "+Inf"), key=float)
    out, prev = {}, 0.0
    for k in keys:
        n = cum[k] - prev
        prev = cum[k]
        if n:
            out[str(int(float(k)))] = n
    return out


def _spec_row(server, before: dict) -> dict:
    after = _metrics(server)
    tokens = after.get("fast_dvlm:spec_tokens_total", 0) - before.get("fast_dvlm:spec_tokens_total", 0)
    forwards = after.get("fast_dvlm:spec_forwards_total", 0) - before.get("fast_dvlm:spec_forwards_total", 0)
    return {"tokens_per_forward_after_prefill": tokens / forwards if forwards else None,
            "rounds_per_draft_length": _draft_lengths(before, after),
            # rounds that drafted nothing, by the AR steps they ran (1: a single step, more: an AR run)
            "rounds_per_ar_run_length": _draft_lengths(before, after, "fast_dvlm:spec_ar_run_length")}


def _median_row(runs: list[dict]) -> dict:
    """The run with the median output throughput (its other fields as measured), plus every
    run's throughput."""
    done = [r for r in runs if r.get("output_throughput")]
    if not done:
        return runs[-1]
    row = dict(sorted(done, key=lambda r: r["output_throughput"])[(len(done) - 1) // 2])
    row["output_throughput_runs"] = [r.get("output_throughput") for r in runs]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(DEFAULT_CONFIGS),
                    help="spec_k0: single AR steps through the dLLM path (its overhead against SGLang's AR "
                         "decode); ar_no_overlap: SGLang's AR without its overlap scheduler")
    ap.add_argument("--concurrency", type=_ints, default=[1, 4, 16])
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds per concurrency")
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if "ar" not in args.configs:
        ap.error("--configs must include ar (every ratio is to AR's run in the same round)")

    model_dir = resolve_model_dir(args.model)
    report = {"what": __doc__.split("\n\n")[0], "date": str(date.today()), "model": args.model,
              "device": f"CPU ({platform.processor() or platform.machine()}), float32, torch_native attention",
              "repeats": args.repeats, "results": {}, "paired_ratio_to_ar": {}, "pooled_ratio_to_ar": {}}
    log_dir = Path(tempfile.mkdtemp(prefix="bench_adaptive_spec_"))
    servers = {name: ServeProcess(model_dir, CONFIGS[name][0], log_dir / f"{name}.log", serve_args=CONFIGS[name][1],
                                  sglang_args=["--enable-metrics", *CONFIGS[name][2]]) for name in args.configs}
    try:
        for server in servers.values():
            server.wait_ready()
        models = {name: server.client().models.list().data[0].id for name, server in servers.items()}
        for c in args.concurrency:
            runs = {name: [] for name in servers}
            for rep in range(args.repeats):
                order = args.configs[rep % len(args.configs):] + args.configs[:rep % len(args.configs)]
                for name in order:
                    server = servers[name]
                    httpx.post(server.base_url + "/flush_cache", timeout=60).raise_for_status()
                    before = _metrics(server) if CONFIGS[name][0] == "spec" else {}
                    row = shared_prefix_load(server, models[name], model_dir, args.timeout, concurrency=c)
                    if CONFIGS[name][0] == "spec":
                        row.update(_spec_row(server, before))
                    runs[name].append(row)
                    print(name, c, rep, json.dumps({k: row.get(k) for k in ("completed", "output_throughput")}),
                          flush=True)
            for name, rows in runs.items():
                report["results"].setdefault(name, {})[str(c)] = _median_row(rows)
                ratios = [r.get("output_throughput", 0) / a["output_throughput"]
                          for r, a in zip(rows, runs["ar"]) if a.get("output_throughput") and r.get("output_throughput")]
                report["paired_ratio_to_ar"].setdefault(name, {})[str(c)] = {
                    "median": statistics.median(ratios) if ratios else None, "runs": ratios}
                report["pooled_ratio_to_ar"].setdefault(name, {})[str(c)] = _pooled(rows, runs["ar"])
    finally:
        for server in servers.values():
            server.stop()
    report["output_throughput_vs_ar"] = {name: {c: v["median"] for c, v in rows.items()}
                                         for name, rows in report["paired_ratio_to_ar"].items()}
    out = args.out or RESULTS / f"adaptive_spec_cpu_{Path(str(args.model)).name}.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(out)
    print(json.dumps(report["output_throughput_vs_ar"], indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
