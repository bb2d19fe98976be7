"""`fast-dvlm bench cost-table`: the adaptive draft policy's forward cost table, measured on the
model (GPU, CUDA graphs) instead of through a server.

    fast-dvlm bench cost-table --config fast-dvlm-3b --random-weights      # benchmarks/gpu.sh runs it

The policy (`decoding/draft_policy.py`) prices a forward over R rows of width w each (T = R x w
tokens, A = R x w x (context + w) attended pairs) as base + per_row R + per_token T + per_pair A.
This times, for each context C, batch size R and width w, the forwards a round of that width runs
on the reference model (`forward.time_forward`: a preallocated KV cache, our Triton attention and,
on CUDA, one captured graph per shape): w = 1 an AR step (causal, KV written); w > 1 a draft
(block-bidirectional, KV not kept) and a verify (causal, KV written), whose mean is the
forward's cost as the policy charges it (a drafting round is both). Then:

- `fit`: the four coefficients by non-negative least squares in relative error (every cell counts
  alike, whatever its time), the RMS relative error of the fitted times, and the same for the
  ratio of each drafting forward to the AR step of its (C, R): what the policy's choice turns on.
  The file is a valid `forward_cost` for `--dllm-algorithm-config` (`ForwardCost.load` reads
  "fit"). `per_round` (the serving engine's bookkeeping between rounds) is not a forward and is
  not measured here: the server adds its own default unless the config names one.
- `implied`: the widths `choose_widths` picks from this fit (the policy's widths and margin) for R
  requests of context C that all accept drafts with probability p, and the expected tokens per
  second of that round over AR steps, for R in the batch sizes, C in the contexts and p on a grid.

Random weights accept no drafts; the cost of a forward does not depend on what it accepts, so the
table is the 3B model's. Writes `results/forward_cost_<cuda|cpu>_<config>.json`.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from .forward import ForwardShape, bench_setup, build_model, time_forward_robust
from .serving_metrics import SCHEMA, environment

FEATURES = ("base", "per_row", "per_token", "per_pair")
ACCEPTANCE_GRID = (0.1, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def cell_shapes(width: int) -> list[ForwardShape]:
    if width == 1:
        return [ForwardShape("ar_step", 1, False, True)]
    return [ForwardShape("draft", width, True, False), ForwardShape("verify", width, False, True)]


def features(rows: int, width: int, context: int) -> list[float]:
    """The policy's cost features of one forward (`draft_policy.round_seconds`)."""
    return [1.0, float(rows), float(rows * width), float(rows * width * (context + width))]


def cells(forwards: list[dict]) -> list[dict]:
    """One cost per (context, batch, width): the mean of the draft and verify forwards (the AR step
    alone at width 1)."""
    out: dict = {}
    for r in forwards:
        out.setdefault((r["context"], r["batch_size"], r["width"]), []).append(r["ms"] / 1e3)
    return [{"context": c, "batch_size": b, "width": w, "seconds": statistics.fmean(v)}
            for (c, b, w), v in sorted(out.items())]


def loadable_nnls(a, b) -> tuple[list[int], list[float]]:
    """min |a x - b| over x >= 0 whose `base` or `per_token` (columns in `FEATURES` order) is
    positive, so that `ForwardCost` loads it. Exact: an NNLS optimum is the plain least squares on
    its own support, so every support of the four features is tried (15 solves) and the best one
    with no negative coefficient wins; `base` alone always qualifies on a design of times divided
    by positive times. (A greedy drop-the-most-negative loop can end on `per_row` alone, which the
    server cannot load: CI hit that with a tiny model's noisy timings.)"""
    import itertools

    import numpy as np

    loadable = {FEATURES.index("base"), FEATURES.index("per_token")}
    best = None
    for size in range(1, len(FEATURES) + 1):
        for support in itertools.combinations(range(len(FEATURES)), size):
            x, *_ = np.linalg.lstsq(a[:, support], b, rcond=None)
            if (x < 0).any() or not any(v > 0 for j, v in zip(support, x) if j in loadable):
                continue
            err = float(np.sum(np.square(a[:, support] @ x - b)))
            if best is None or err < best[0]:
                best = (err, list(support), [float(v) for v in x])
    if best is None:
        raise ValueError("no non-negative cost fit with base or per_token > 0 (are the times positive?)")
    return best[1], best[2]


def fit_cost(table: list[dict]) -> dict:
    """Non-negative least squares of seconds = features . coef in relative error (each row of the
    design divided by its measured time; `loadable_nnls`), plus the RMS relative error of the times
    and of each drafting cell's ratio to its AR step (the policy compares widths by that ratio)."""
    import numpy as np

    a = np.array([features(r["batch_size"], r["width"], r["context"]) for r in table]) / \
        np.array([r["seconds"] for r in table])[:, None]
    active, x = loadable_nnls(a, np.ones(len(table)))
    coef = dict.fromkeys(FEATURES, 0.0)
    coef.update({FEATURES[i]: float(v) for i, v in zip(active, x)})
    vec = np.array([coef[n] for n in FEATURES])

    def predict(r):
        return float(np.array(features(r["batch_size"], r["width"], r["context"])) @ vec)

    step = {(r["context"], r["batch_size"]): r for r in table if r["width"] == 1}
    time_err = [predict(r) / r["seconds"] - 1 for r in table]
    ratio_err = [(predict(r) / predict(step[k])) / (r["seconds"] / step[k]["seconds"]) - 1
                 for r in table if r["width"] > 1 and (k := (r["context"], r["batch_size"])) in step]
    coef["residual"] = float(np.sqrt(np.mean(np.square(time_err))))
    coef["ratio_residual"] = float(np.sqrt(np.mean(np.square(ratio_err)))) if ratio_err else 0.0
    return coef


def implied_widths(coef: dict, batch_sizes: list[int], contexts: list[int], block_size: int = 32,
                   grid: tuple[float, ...] = ACCEPTANCE_GRID) -> list[dict]:
    """What the policy would draft with this cost table: for R requests of context C all accepting
    with probability p, the widths `choose_widths` picks (the policy's widths and margin) and the
    expected tokens/s of that round over a round of AR steps (1.0 where it keeps AR steps)."""
    from fast_dvlm_sglang.decoding.draft_policy import (
        DraftPolicy,
        ForwardCost,
        choose_widths,
        expected_tokens,
        round_seconds,
    )

    cost = ForwardCost.load({k: coef[k] for k in FEATURES})
    policy = DraftPolicy(block_size=block_size, cost=cost)
    out = []
    for context in contexts:
        for rows in batch_sizes:
            for p in grid:
                allowed = [list(policy.widths)] * rows
                widths = choose_widths([p] * rows, [context] * rows, allowed, cost, policy.margin)
                tps = sum(expected_tokens(p, w) for w in widths) / round_seconds(cost, widths, [context] * rows)
                ar = rows / round_seconds(cost, [1] * rows, [context] * rows)
                out.append({"context": context, "batch_size": rows, "acceptance": p,
                            "draft_lengths": sorted({w - 1 for w in widths}), "speedup_vs_ar": tps / ar})
    return out


def cost_table_bench(args) -> dict:
    device, graphs, dtype, cfg = bench_setup(args)
    state = {"attention": args.attention if device.type == "cuda" else "sdpa", "fp8_gemm": args.fp8_gemm,
             "graphs": graphs}
    model = build_model(cfg, args.precision, device, dtype, attention=state["attention"], fp8_gemm=state["fp8_gemm"])
    forwards = []
    for context in args.contexts:
        for batch in args.batch_sizes:
            for width in args.widths:
                for shape in cell_shapes(width):
                    seconds = time_forward_robust(model, cfg, shape, batch, context, state=state, reps=args.reps,
                                                  dtype=dtype)
                    if seconds is None:
                        continue
                    row = {"context": context, "batch_size": batch, "width": width, "forward": shape.name,
                           "tokens": batch * width, "ms": seconds * 1e3,
                           "paths": {k: state[k] for k in ("attention", "fp8_gemm", "graphs")}}
                    forwards.append(row)
                    if not args.quiet:
                        print(f"cost C={context} B={batch} w={width} {shape.name}: {seconds * 1e3:.3f} ms", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    env = environment()
    report = {"schema": SCHEMA, "kind": "forward_cost", "environment": env,
              "settings": {"model": f"{args.config} (random weights)", "precision": args.precision,
                           "device_type": device.type,
                           "contexts": args.contexts, "batch_sizes": args.batch_sizes, "widths": args.widths,
                           "reps": args.reps, "cuda_graphs": graphs, "compute_dtype": str(dtype).replace("torch.", ""),
                           "paths": state,
                           "command": " ".join(["fast-dvlm", "bench", *getattr(args, "argv", [])])},
              "forwards": forwards}
    return refit(report)


def refit(report: dict) -> dict:
    """`cells`, `fit` and `implied` of a report from its `forwards` (also for a committed file)."""
    table = cells(report["forwards"])
    env, settings = report["environment"], report["settings"]
    report["cells"] = table
    report["fit"] = {**fit_cost(table), "unit": "seconds per forward", "device": env["device"],
                     "model": settings["model"], "source": "benchmarks/cost_table.py"}
    report["implied"] = implied_widths(report["fit"], settings["batch_sizes"], settings["contexts"])
    return report


def cost_table_markdown(report: dict) -> str:
    """Measured ms per forward (rows: context, batch; columns: width) and the implied draft lengths."""
    widths = report["settings"]["widths"]
    grid = sorted({r["acceptance"] for r in report["implied"]})
    lines = ["| context | batch | " + " | ".join(f"w={w} ms" for w in widths) + " |",
             "|---|---|" + "---|" * len(widths)]
    ms = {(r["context"], r["batch_size"], r["width"]): r["seconds"] * 1e3 for r in report["cells"]}
    for c in report["settings"]["contexts"]:
        for b in report["settings"]["batch_sizes"]:
            lines.append(f"| {c} | {b} | " + " | ".join(f"{ms[(c, b, w)]:.3f}" if (c, b, w) in ms else "-"
                                                       for w in widths) + " |")
    f = report["fit"]
    lines += ["", f"fit (seconds per forward): base {f['base']:.3g}, per_row {f['per_row']:.3g}, "
              f"per_token {f['per_token']:.3g}, per_pair {f['per_pair']:.3g}; RMS relative error "
              f"{f['residual']:.1%} (times), {f['ratio_residual']:.1%} (draft / AR-step ratios)", "",
              "draft length k the policy picks (speedup over AR steps) for requests accepting with probability p:",
              "", "| context | batch | " + " | ".join(f"p={p}" for p in grid) + " |", "|---|---|" + "---|" * len(grid)]
    implied = {(r["context"], r["batch_size"], r["acceptance"]): r for r in report["implied"]}
    for c in report["settings"]["contexts"]:
        for b in report["settings"]["batch_sizes"]:
            cells_ = [implied[(c, b, p)] for p in grid]
            lines.append(f"| {c} | {b} | " + " | ".join(
                f"{'/'.join(map(str, r['draft_lengths']))} ({r['speedup_vs_ar']:.2f}x)" for r in cells_) + " |")
    return "\n".join(lines) + "\n"


def write_cost_table(report: dict, out: Path) -> list[Path]:
    import json

    from .suite import write_texts

    out = Path(out)
    return write_texts([(out, json.dumps(report, indent=1) + "\n"), (out.with_suffix(".md"), cost_table_markdown(report))])
