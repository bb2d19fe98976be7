"""The speculative draft-length cost model, measured through the serving path and fitted.

    .venv-sglang/bin/python benchmarks/bench_forward_cost.py --model demo

Starts `fast-dvlm serve --algorithm spec` (and, for comparison, `--algorithm ar`) and times
decoding rounds the way a user's requests run them: `concurrency` requests at once, each pinned
to draft length k (`/generate` with `custom_params: {draft_length: k}`), random token prompts of
`context` tokens, `ignore_eos`, sampled at temperature 1.5. A round's time is the difference of two runs that differ only in
the tokens generated, over the difference of their rounds (`meta_info.dllm_spec_round`), which
cancels the prefill and the HTTP overhead. A round is one forward (k = 0) or two (draft and
verify) over T = concurrency * (k + 1) tokens; the fit is the `ForwardCost` model of
`decoding/draft_policy.py` (seconds per forward = base + per_row * rows + per_token * T +
per_pair * attended pairs), by non-negative least squares in relative error of the round times
and of each drafting round's ratio to the AR step of its cell (`fit`).

Writes `benchmarks/results/forward_cost_<device>_<model>.json`; pass it to the server as
`forward_cost: <path>` in `--dllm-algorithm-config` (the CPU default in `draft_policy.py` is the
fit of this file on the CI machine).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import platform
import random
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

from fast_dvlm_sglang.benchmarks.cost_table import FEATURES, loadable_nnls
from fast_dvlm_sglang.config import resolve_model_dir
from fast_dvlm_sglang.server_process import ServeProcess

RESULTS = Path(__file__).parent / "results"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _generate(server, ids, max_new, k):
    import httpx

    # Sampled at a high temperature: drafts rarely match, so rounds ~ tokens and the difference of
    # two runs spans many rounds (the cost of a round does not depend on what it accepts).
    sp = {"max_new_tokens": max_new, "temperature": 1.5, "sampling_seed": 0, "ignore_eos": True}
    if k is not None:
        sp["custom_params"] = {"draft_length": k}
    r = httpx.post(server.base_url + "/generate", json={"input_ids": ids, "sampling_params": sp}, timeout=1800)
    r.raise_for_status()
    return r.json()


def _batch(server, prompts, max_new, k):
    """(wall seconds, mean rounds per request) of the prompts sent at once."""
    start = time.perf_counter()
    with cf.ThreadPoolExecutor(len(prompts)) as pool:
        bodies = list(pool.map(lambda ids: _generate(server, ids, max_new, k), prompts))
    wall = time.perf_counter() - start
    rounds = [b["meta_info"].get("dllm_spec_round", [0] * max_new)[-1] if k is not None else max_new - 1
              for b in bodies]
    return wall, sum(rounds) / len(rounds)


def measure(server, vocab, concurrency, k, context, short, long, rng):
    prompts = [[rng.randrange(100, vocab - 100) for _ in range(context)] for _ in range(concurrency)]
    _batch(server, prompts, 2, k)  # warm the shapes; the radix cache then holds these prompts
    w1, r1 = _batch(server, prompts, short, k)
    w2, r2 = _batch(server, prompts, long, k)
    return {"concurrency": concurrency, "draft_length": k, "context": context,
            "round_s": (w2 - w1) / max(r2 - r1, 1e-9), "rounds": [r1, r2], "wall_s": [w1, w2]}


RATIO_WEIGHT = 2.0


def fit(rows: list[dict], long: int) -> dict:
    """Non-negative least squares of round_s = forwards * cost(tokens, rows, pairs), in relative
    error, together with each drafting round's ratio to the AR step of its cell (weight
    `RATIO_WEIGHT`): the policy compares rounds of different widths, so relative costs are what
    it decides on, and a fit of the times alone lets the cells with the longest rounds set them."""
    import numpy as np

    names = list(FEATURES)

    def features(c, k, ctx):
        width = k + 1
        return (1 if k == 0 else 2) * np.array([1.0, c, c * width, c * width * (ctx + long / 2 + width)])

    step = {(r["concurrency"], r["context"]): r["round_s"] for r in rows if r["draft_length"] == 0}
    a, b = [], []
    for r in rows:
        c, k, ctx = r["concurrency"], r["draft_length"], r["context"]
        a.append(features(c, k, ctx) / r["round_s"])
        b.append(1.0)
        if k > 0 and (c, ctx) in step:
            ratio = r["round_s"] / step[(c, ctx)]
            a.append(RATIO_WEIGHT * (features(c, k, ctx) - ratio * features(c, 0, ctx)) / r["round_s"])
            b.append(0.0)
    active, x = loadable_nnls(np.array(a), np.array(b))
    coef = dict.fromkeys(names, 0.0)
    coef.update({names[i]: float(v) for i, v in zip(active, x)})
    vec = np.array([coef[n] for n in names])
    time_err = [features(r["concurrency"], r["draft_length"], r["context"]) @ vec / r["round_s"] - 1 for r in rows]
    ratio_err = [(features(r["concurrency"], r["draft_length"], r["context"]) @ vec
                  / (features(r["concurrency"], 0, r["context"]) @ vec))
                 / (r["round_s"] / step[(r["concurrency"], r["context"])]) - 1
                 for r in rows if r["draft_length"] > 0 and (r["concurrency"], r["context"]) in step]
    coef["residual"] = float(np.sqrt(np.mean(np.square(time_err))))  # RMS relative error of the times
    coef["ratio_residual"] = float(np.sqrt(np.mean(np.square(ratio_err)))) if ratio_err else 0.0
    return coef


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--concurrency", type=_ints, default=[1, 4, 16])
    ap.add_argument("--draft-lengths", type=_ints, default=[0, 3, 7, 15, 31])
    ap.add_argument("--contexts", type=_ints, default=[64, 384, 1024])
    ap.add_argument("--short", type=int, default=8)
    ap.add_argument("--long", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-ar", action="store_true")
    ap.add_argument("--pool-tokens", type=int, default=8192, help="the server's KV pool (cells beyond it are skipped)")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved sweeps; a cell's time is their median")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--refit", type=Path, default=None, help="only recompute the fit of an existing results file")
    args = ap.parse_args()
    if args.refit is not None:
        report = json.loads(args.refit.read_text())
        report["fit"] = {**fit(report["spec"], report["settings"]["long"]), "unit": "seconds per forward",
                         "source": "benchmarks/bench_forward_cost.py"}
        tmp = args.refit.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        tmp.replace(args.refit)
        print(json.dumps(report["fit"]))
        return

    model_dir = resolve_model_dir(args.model)
    vocab = json.loads((Path(model_dir) / "config.json").read_text()).get("vocab_size") or 151_000
    vocab = min(int(vocab), 150_000)
    rng = random.Random(args.seed)
    log_dir = Path(tempfile.mkdtemp(prefix="bench_forward_cost_"))
    report = {"what": __doc__.split("\n\n")[0], "date": str(date.today()), "model": args.model,
              "device": f"CPU ({platform.processor() or platform.machine()}), float32, torch_native attention",
              "settings": {k: v for k, v in vars(args).items() if k != "out"}, "spec": [], "ar": []}
    # Both servers up at once and every cell measured `repeats` times in interleaved sweeps (the
    # machine's speed drifts by tens of percent over minutes): a cell's round time is the median
    # of its runs, its ratio to AR the median of the ratios to the AR run of the same sweep.
    servers = {"spec": ServeProcess(model_dir, "spec", log_dir / "spec.log")}
    if not args.skip_ar:
        servers["ar"] = ServeProcess(model_dir, "ar", log_dir / "ar.log")
    # Cells whose requests would not fit the KV pool at once measure retractions, not rounds.
    cells = [(ctx, c) for ctx in args.contexts for c in args.concurrency
             if c * (ctx + args.long + 32) <= args.pool_tokens]
    runs: dict = {}
    try:
        for server in servers.values():
            server.wait_ready()
        for rep in range(args.repeats):
            for ctx, c in cells:
                plan = [("spec", k) for k in args.draft_lengths] + ([("ar", None)] if "ar" in servers else [])
                for algorithm, k in plan[rep % len(plan):] + plan[:rep % len(plan)]:
                    row = measure(servers[algorithm], vocab, c, k, ctx, args.short, args.long, rng)
                    runs.setdefault((algorithm, ctx, c, k), []).append(row)
                    print(algorithm, rep, json.dumps(row), flush=True)
    finally:
        for server in servers.values():
            server.stop()

    def summary(key):
        rows = runs[key]
        return {**{f: rows[0][f] for f in ("concurrency", "draft_length", "context")},
                "round_s": statistics.median(r["round_s"] for r in rows),
                "round_s_runs": [r["round_s"] for r in rows]}

    report["spec"] = [summary(("spec", ctx, c, k)) for ctx, c in cells for k in args.draft_lengths]
    report["ar"] = [summary(("ar", ctx, c, None)) for ctx, c in cells] if "ar" in servers else []
    report["fit"] = {**fit(report["spec"], args.long), "unit": "seconds per forward",
                     "source": "benchmarks/bench_forward_cost.py"}
    for r in report["spec"]:
        ar_runs = runs.get(("ar", r["context"], r["concurrency"], None))
        if ar_runs:
            r["round_vs_ar_step"] = statistics.median(s / a["round_s"] for s, a in zip(r["round_s_runs"], ar_runs))
    out = args.out or RESULTS / f"forward_cost_cpu_{Path(str(args.model)).name}.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(out)
    print(json.dumps(report["fit"]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
