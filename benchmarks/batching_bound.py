"""How far spec can lead AR while decoding, at each concurrency, from measured rounds.

    .venv-sglang/bin/python benchmarks/batching_bound.py \
        --cost benchmarks/results/forward_cost_cpu_demo_20261207.json \
        --acceptance benchmarks/results/draft_length_cpu_demo.json \
        --out benchmarks/results/batching_bound_cpu_demo.json

The benchmark issue's batching target, spec at 16 / spec at 1 >= AR at 16 / AR at 1, is the same
as: spec's lead over AR (its tokens/s over AR's, same load) at 16 in flight >= its lead at 1. This
bounds that lead for the decoding phase, the part of a request a draft length can change:

    lead(c, k) = committed(k) * ar_step(c) / round(c, k)

- `round(c, k)`, `ar_step(c)`: seconds per spec round pinned to draft length k (k = 0: one AR
  step of spec's server) and per AR step, with c requests decoding at once, measured through the
  server (`bench_forward_cost.py`: the difference of two runs, which cancels prefill and HTTP);
- `committed(k)`: tokens a round of draft length k commits (accepted drafts + the next seed) on
  the demo prompts, greedy (`bench_draft_length.py`, the reference decoders; acceptance does not
  depend on the batch: greedy rounds are the same tokens at any concurrency).

`best(c)` = max over k: what the best draft length, chosen knowing everything, could give. If
best(16) < best(1), no draft-length policy meets the target in the decoding phase; the prefill
(same work for both algorithms) and each request's way through HTTP and the tokenizer only pull
both leads towards 1. Writes the table as JSON (`--out`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def committed_per_round(acceptance: dict, workload: str = "demo") -> dict[int, float]:
    """{draft length: tokens committed per round}; draft length 0 (an AR step) commits 1."""
    native = acceptance["acceptance"][workload]["native"]
    out = {0: 1.0}
    for row in native.values():
        out[int(row["draft_len"])] = float(row["mean_committed_per_round"])
    return out


def decode_leads(cost: dict, committed: dict[int, float]) -> dict[int, dict]:
    """{context: {concurrency: {"ar_step_s", "lead": {k: lead}, "best_k", "best"}}} for every cell
    the cost file has both an AR step and spec rounds for (draft lengths without an acceptance
    measurement are left out)."""
    ar = {(r["concurrency"], r["context"]): r["round_s"] for r in cost["ar"]}
    out: dict[int, dict] = {}
    for r in cost["spec"]:
        c, k, ctx = r["concurrency"], r["draft_length"], r["context"]
        if (c, ctx) not in ar or k not in committed or r["round_s"] <= 0:
            continue
        cell = out.setdefault(ctx, {}).setdefault(c, {"ar_step_s": ar[(c, ctx)], "lead": {}})
        cell["lead"][k] = committed[k] * ar[(c, ctx)] / r["round_s"]
    for cells in out.values():
        for cell in cells.values():
            cell["best_k"] = max(cell["lead"], key=cell["lead"].get)
            cell["best"] = cell["lead"][cell["best_k"]]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cost", type=Path, default=RESULTS / "forward_cost_cpu_demo_20261207.json")
    ap.add_argument("--acceptance", type=Path, default=RESULTS / "draft_length_cpu_demo.json")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    for path in (args.cost, args.acceptance):
        if not path.is_file():
            print(f"batching_bound: {path}: no such file", file=sys.stderr)
            return 2
    cost = json.loads(args.cost.read_text())
    committed = committed_per_round(json.loads(args.acceptance.read_text()))
    leads = decode_leads(cost, committed)
    for ctx, cells in sorted(leads.items()):
        print(f"context {ctx}: best lead over AR by concurrency (draft length), then every draft length")
        for c, cell in sorted(cells.items()):
            each = " ".join(f"k{k}={v:.2f}" for k, v in sorted(cell["lead"].items()))
            print(f"  {c:>3} in flight: {cell['best']:.2f} (k={cell['best_k']})   AR step "
                  f"{cell['ar_step_s'] * 1e3:.1f} ms   {each}")
    if args.out:
        report = {"what": __doc__.split("\n\n")[0], "cost": str(args.cost), "acceptance": str(args.acceptance),
                  "cost_date": cost.get("date"), "device": cost.get("device"), "committed_per_round": committed,
                  "leads": {str(ctx): {str(c): {**cell, "lead": {str(k): v for k, v in cell["lead"].items()}}
                                       for c, cell in cells.items()} for ctx, cells in leads.items()},
                  "command": " ".join(["python", "benchmarks/batching_bound.py", *(argv or sys.argv[1:])])}
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
