"""Speculation against AR on text no draft can guess, with SGLang's own benchmark client.

    .venv-sglang/bin/python benchmarks/bench_adaptive_spec.py --model demo

For each configuration, one `fast-dvlm serve` process (`ar`; `spec` with its default adaptive
draft length; `spec --draft-length 31`, the whole-block rounds spec ran before the adaptive
policy; optionally `spec --draft-length 0`, AR steps through the dLLM path) and `python -m sglang.bench_serving` on its generated-shared-prefix dataset (random-token
prompts of ~1.1k tokens: 2 groups x 8 prompts, a 1024-token shared system prompt, 32-token
questions, 48 output tokens) at each `--concurrency`, the adaptive-speculation issue's command.
For spec, `/metrics` gives the tokens per forward and the draft lengths the policy chose.
Writes `benchmarks/results/adaptive_spec_<device>_<model>.json`.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from datetime import date
from pathlib import Path

import httpx
from bench_prefix_cache import shared_prefix_load  # same folder: run as benchmarks/bench_adaptive_spec.py

from fast_dvlm_sglang.config import resolve_model_dir
from fast_dvlm_sglang.server_process import ServeProcess

RESULTS = Path(__file__).parent / "results"
CONFIGS = {"ar": ("ar", []), "spec": ("spec", []), "spec_k31": ("spec", ["--draft-length", "31"]),
           "spec_k0": ("spec", ["--draft-length", "0"])}
DEFAULT_CONFIGS = ("ar", "spec", "spec_k31")


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


def _draft_lengths(before: dict, after: dict) -> dict[str, float]:
    """Rounds per draft length bucket (the histogram's cumulative buckets, differenced)."""
    cum = {}
    for name, value in after.items():
        if name.startswith("fast_dvlm:spec_draft_length_bucket"):
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(DEFAULT_CONFIGS),
                    help="spec_k0: AR steps through the dLLM path (its overhead against SGLang's AR decode)")
    ap.add_argument("--concurrency", type=_ints, default=[1, 4, 16])
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    model_dir = resolve_model_dir(args.model)
    report = {"what": __doc__.split("\n\n")[0], "date": str(date.today()), "model": args.model,
              "device": f"CPU ({platform.processor() or platform.machine()}), float32, torch_native attention",
              "results": {}}
    log_dir = Path(tempfile.mkdtemp(prefix="bench_adaptive_spec_"))
    for name in args.configs:
        algorithm, serve_args = CONFIGS[name]
        server = ServeProcess(model_dir, algorithm, log_dir / f"{name}.log", serve_args=serve_args,
                              sglang_args=["--enable-metrics"])
        rows = {}
        try:
            server.wait_ready()
            model = server.client().models.list().data[0].id
            for c in args.concurrency:
                before = _metrics(server) if algorithm == "spec" else {}
                row = shared_prefix_load(server, model, model_dir, args.timeout, concurrency=c)
                if algorithm == "spec":
                    after = _metrics(server)
                    tokens = after.get("fast_dvlm:spec_tokens_total", 0) - before.get("fast_dvlm:spec_tokens_total", 0)
                    forwards = (after.get("fast_dvlm:spec_forwards_total", 0)
                                - before.get("fast_dvlm:spec_forwards_total", 0))
                    row["tokens_per_forward_after_prefill"] = tokens / forwards if forwards else None
                    row["rounds_per_draft_length"] = _draft_lengths(before, after)
                rows[str(c)] = row
                print(name, c, json.dumps(row), flush=True)
        finally:
            server.stop()
        report["results"][name] = rows
    res = report["results"]
    if "ar" in res:
        report["output_throughput_vs_ar"] = {
            name: {c: (r.get("output_throughput") or 0) / res["ar"][c]["output_throughput"]
                   for c, r in rows.items() if c in res["ar"] and res["ar"][c].get("output_throughput")}
            for name, rows in res.items()}
    out = args.out or RESULTS / f"adaptive_spec_cpu_{Path(str(args.model)).name}.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(out)
    print(json.dumps(report.get("output_throughput_vs_ar"), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
