"""MDM stopping its denoising at a stop (the default) against whole blocks (`--mdm-full-blocks`,
the paper's NFE convention): forwards and tokens/s, both servers up, runs interleaved.

    .venv-sglang/bin/python benchmarks/bench_mdm_stop.py --concurrency 1,16 --repeats 4

Each run is `fast-dvlm bench online` on the held-out demo prompts (the same requests for both;
the answers must be equal, only the forwards differ). Writes
`benchmarks/results/mdm_stop_cpu_demo.json`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def main() -> int:
    from fast_dvlm_sglang.demo import DEMO_CHECKPOINT
    from fast_dvlm_sglang.server_process import ServeProcess

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=4)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mdm-stop-"))
    servers = {"stop": ServeProcess(DEMO_CHECKPOINT, "mdm", tmp / "stop.log", max_running=16,
                                    sglang_args=["--enable-metrics"]),
               "full": ServeProcess(DEMO_CHECKPOINT, "mdm", tmp / "full.log", max_running=16,
                                    serve_args=["--mdm-full-blocks"], sglang_args=["--enable-metrics"])}
    results = {}
    try:
        for s in servers.values():
            s.wait_ready(timeout=600)
        for c in [int(x) for x in args.concurrency.split(",")]:
            runs = {name: [] for name in servers}
            for i in range(args.repeats):
                order = ("stop", "full") if i % 2 == 0 else ("full", "stop")
                for name in order:
                    out = tmp / f"{name}-{c}-{i}.json"
                    subprocess.run([sys.executable, "-m", "fast_dvlm_sglang.cli", "bench", "online", "--base-url",
                                    servers[name].base_url, "--algorithm", "mdm", "--concurrency", str(c),
                                    "--requests", str(args.requests), "--max-new-tokens", str(args.max_new_tokens),
                                    "--quiet", "--no-plots", "--out", str(out)], check=True, capture_output=True)
                    report = json.loads(out.read_text())
                    runs[name].append({**{k: report["summary"][0][k] for k in
                                          ("output_tokens_per_s", "output_tokens", "nfe", "tokens_per_nfe")},
                                       "answers": report["details"][0]["answers"]})
            tps = {n: statistics.median(r["output_tokens_per_s"] for r in rs) for n, rs in runs.items()}
            results[str(c)] = {
                "median_output_tokens_per_s": tps, "speedup": tps["stop"] / tps["full"],
                "nfe": {n: rs[0]["nfe"] for n, rs in runs.items()},
                "tokens_per_nfe": {n: rs[0]["tokens_per_nfe"] for n, rs in runs.items()},
                "forwards_saved": 1 - runs["stop"][0]["nfe"] / runs["full"][0]["nfe"],
                "answers_equal": all(a["answers"] == b["answers"] for a, b in zip(runs["stop"], runs["full"])),
                "runs": {n: [r["output_tokens_per_s"] for r in rs] for n, rs in runs.items()}}
            print(c, json.dumps({k: v for k, v in results[str(c)].items() if k != "runs"}), flush=True)
    finally:
        for s in servers.values():
            s.stop()
    out = RESULTS / "mdm_stop_cpu_demo.json"
    out.write_text(json.dumps({"what": __doc__.split("\n\n")[0], "model": "demo", "requests": args.requests,
                               "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "results": results,
                               "command": " ".join(["python", *sys.argv])}, indent=1) + "\n")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
