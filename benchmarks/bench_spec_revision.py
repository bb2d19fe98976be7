"""Spec at this checkout against spec at another git revision (and AR), on the demo prompts,
runs interleaved: did a change to the plugin move spec's speed where drafts land?

    .venv-sglang/bin/python benchmarks/bench_spec_revision.py --revision e79aaf6 --concurrency 1,4,16

Three `fast-dvlm serve` processes, all up at once: `ar`, `spec` from this checkout, and `spec`
from `--revision` (a `git worktree` in a temporary folder, put first on the server's
PYTHONPATH: the same environment, only our package differs). Each run is the serving
benchmark's load (`benchmarks/load.py`: the held-out demo prompts with their images, streamed
OpenAI chat, `--concurrency` in flight) on one server; for each concurrency `--repeats` rounds,
each running the three once in a rotated order, so every ratio compares runs seconds apart
(single runs of one configuration on this 2-core machine range by up to 1.6x). Reports each
spec's pooled ratio to AR (all its runs' tokens over all their time) and the median of the
paired ratios. Writes `benchmarks/results/spec_revision_<device>_demo.json`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import tempfile
from datetime import date
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parent.parent


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    from fast_dvlm_sglang.benchmarks.load import demo_requests, run_load
    from fast_dvlm_sglang.demo import DEMO_CHECKPOINT
    from fast_dvlm_sglang.server_process import ServeProcess

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--revision", required=True, help="the git revision to compare with (e.g. HEAD, a hash)")
    ap.add_argument("--concurrency", type=_ints, default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--out", type=Path, default=RESULTS / "spec_revision_cpu_demo.json")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="spec-revision-"))
    other = tmp / "checkout"
    rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", args.revision], check=True,
                         capture_output=True, text=True).stdout.strip()
    here = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], check=True,
                          capture_output=True, text=True).stdout.strip()
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(other), rev], check=True,
                   capture_output=True)
    servers = {"ar": ServeProcess(DEMO_CHECKPOINT, "ar", tmp / "ar.log", max_running=16),
               "spec": ServeProcess(DEMO_CHECKPOINT, "spec", tmp / "spec.log", max_running=16),
               f"spec@{rev}": ServeProcess(DEMO_CHECKPOINT, "spec", tmp / "spec_rev.log", max_running=16,
                                           env={"PYTHONPATH": str(other)}, cwd=other)}
    requests = demo_requests(args.requests, args.max_new_tokens)
    runs: dict[str, dict[int, list[tuple[int, float]]]] = {name: {} for name in servers}  # (tokens, seconds)
    try:
        for server in servers.values():
            server.wait_ready()
        clients = {name: server.client() for name, server in servers.items()}
        models = {name: client.models.list().data[0].id for name, client in clients.items()}
        names = list(servers)
        for c in args.concurrency:
            for rep in range(args.repeats):
                for name in names[rep % len(names):] + names[:rep % len(names)]:
                    records, duration = run_load(clients[name], models[name], requests, c, progress=False)
                    tokens = sum(r.output_tokens for r in records)
                    runs[name].setdefault(c, []).append((tokens, duration))
                    print(name, c, rep, round(tokens / duration, 1), flush=True)
    finally:
        for server in servers.values():
            server.stop()
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(other)], check=False,
                       capture_output=True)
    report = {"what": __doc__.split("\n\n")[0], "date": str(date.today()), "model": "demo",
              "device": f"CPU ({platform.processor() or platform.machine()}), float32, torch_native attention",
              "this_checkout": here, "revision": rev, "requests": args.requests,
              "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
              "output_tokens_per_s": {name: {str(c): [t / d for t, d in v] for c, v in by_c.items()}
                                      for name, by_c in runs.items()},
              "pooled_ratio_to_ar": {}, "paired_ratio_to_ar": {}}

    def pooled(rows):  # all runs' tokens over all their time
        return sum(t for t, _ in rows) / sum(d for _, d in rows)

    for name in names[1:]:
        for c in args.concurrency:
            ours, ar = runs[name][c], runs["ar"][c]
            report["pooled_ratio_to_ar"].setdefault(name, {})[str(c)] = pooled(ours) / pooled(ar)
            report["paired_ratio_to_ar"].setdefault(name, {})[str(c)] = statistics.median(
                (t / d) / (ta / da) for (t, d), (ta, da) in zip(ours, ar))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(report, indent=1) + "\n")
    tmp_out.replace(args.out)
    print(json.dumps({k: report[k] for k in ("pooled_ratio_to_ar", "paired_ratio_to_ar")}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
