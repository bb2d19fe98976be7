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
per_pair * attended pairs), by non-negative least squares in relative error.

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
import tempfile
import time
from datetime import date
from pathlib import Path

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


def fit(rows: list[dict], long: int) -> dict:
    """Non-negative least squares in relative error of round_s = forwards * cost(tokens, rows, pairs)."""
    import numpy as np

    names = ["base", "per_row", "per_token", "per_pair"]
    a, b = [], []
    for r in rows:
        c, k, ctx = r["concurrency"], r["draft_length"], r["context"]
        forwards = 1 if k == 0 else 2
        width = k + 1
        feats = [1.0, c, c * width, c * width * (ctx + long / 2 + width)]
        a.append([forwards * f / r["round_s"] for f in feats])
        b.append(1.0)
    a, b = np.array(a), np.array(b)
    active = list(range(len(names)))
    while True:  # drop negative coefficients until none is left (a small active-set NNLS)
        x, *_ = np.linalg.lstsq(a[:, active], b, rcond=None)
        if (x >= 0).all():
            break
        active.pop(int(np.argmin(x)))
    coef = dict.fromkeys(names, 0.0)
    coef.update({names[i]: float(v) for i, v in zip(active, x)})
    pred = a[:, :] @ np.array([coef[n] for n in names])
    coef["residual"] = float(np.sqrt(np.mean((pred - 1.0) ** 2)))  # RMS relative error
    return coef


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--concurrency", type=_ints, default=[1, 4, 16])
    ap.add_argument("--draft-lengths", type=_ints, default=[0, 3, 7, 15, 31])
    ap.add_argument("--contexts", type=_ints, default=[64, 1024])
    ap.add_argument("--short", type=int, default=8)
    ap.add_argument("--long", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-ar", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    model_dir = resolve_model_dir(args.model)
    vocab = json.loads((Path(model_dir) / "config.json").read_text()).get("vocab_size") or 151_000
    vocab = min(int(vocab), 150_000)
    rng = random.Random(args.seed)
    log_dir = Path(tempfile.mkdtemp(prefix="bench_forward_cost_"))
    report = {"what": __doc__.split("\n\n")[0], "date": str(date.today()), "model": args.model,
              "device": f"CPU ({platform.processor() or platform.machine()}), float32, torch_native attention",
              "settings": {k: v for k, v in vars(args).items() if k != "out"}, "spec": [], "ar": []}
    def sweep(algorithm: str, draft_lengths: list) -> list[dict]:
        rows = []
        server = ServeProcess(model_dir, algorithm, log_dir / f"{algorithm}.log")
        try:
            server.wait_ready()
            for ctx in args.contexts:
                for c in args.concurrency:
                    for k in draft_lengths:
                        rows.append(measure(server, vocab, c, k, ctx, args.short, args.long, rng))
                        print(algorithm, json.dumps(rows[-1]), flush=True)
        finally:
            server.stop()
        return rows

    report["spec"] = sweep("spec", args.draft_lengths)
    if not args.skip_ar:
        report["ar"] = sweep("ar", [None])  # SGLang's own decode step, for comparison
    report["fit"] = {**fit(report["spec"], args.long), "unit": "seconds per forward",
                     "source": "benchmarks/bench_forward_cost.py"}
    ar = {(r["context"], r["concurrency"]): r["round_s"] for r in report["ar"]}
    for r in report["spec"]:
        if (r["context"], r["concurrency"]) in ar:
            r["round_vs_ar_step"] = r["round_s"] / ar[(r["context"], r["concurrency"])]
    out = args.out or RESULTS / f"forward_cost_cpu_{Path(str(args.model)).name}.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(out)
    print(json.dumps(report["fit"]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
