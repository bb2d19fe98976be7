"""spec through SGLang's scale-out on this machine: one worker, `-- --dp 2`, `-- --tp 2`, and
SGLang's router over two one-worker servers, each driven by `fast-dvlm bench online`.

    .venv-sglang/bin/python benchmarks/bench_scale_out.py --concurrency 16 --requests 32

One setup at a time (each takes every core: a rank per core for dp/tp, two servers sharing the
cores for the router). Greedy answers are compared with the one-worker setup's. Writes
`benchmarks/results/bench_scale_out_cpu_demo.json` (a bench report: one summary row per setup,
`algorithm` naming it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _online(base_url: str, label: str, args, out: Path) -> dict:
    cmd = [sys.executable, "-m", "fast_dvlm_sglang.cli", "bench", "online", "--base-url", base_url, "--algorithm",
           label, "--concurrency", str(args.concurrency), "--requests", str(args.requests), "--max-new-tokens",
           str(args.max_new_tokens), "--quiet", "--no-plots", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.read_text())


def _wait_http(url: str, proc, timeout: float = 120) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited")
        try:  # the router registers its workers after it starts serving: wait for them
            r = httpx.get(url + "/v1/models", timeout=2)
            if r.status_code == 200 and r.json().get("data"):
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


def main() -> int:
    from fast_dvlm_sglang.benchmarks.serving_metrics import SCHEMA, environment
    from fast_dvlm_sglang.demo import DEMO_CHECKPOINT
    from fast_dvlm_sglang.server_process import ServeProcess, free_port

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="scale-out-"))
    rows, details = [], []

    def record(label, report):
        row, det = report["summary"][0], report["details"][0]
        rows.append(row)
        details.append(det)
        print(label, round(row["output_tokens_per_s"], 1), "tok/s", flush=True)

    for label, sglang_args in (("spec 1 worker", []), ("spec dp 2", ["--dp", "2"]), ("spec tp 2", ["--tp", "2"])):
        server = ServeProcess(DEMO_CHECKPOINT, "spec", tmp / f"{label}.log", max_running=args.concurrency,
                              sglang_args=sglang_args)
        try:
            server.wait_ready(timeout=600)
            record(label, _online(server.base_url, label, args, tmp / f"{label}.json"))
        finally:
            server.stop()
    workers = [ServeProcess(DEMO_CHECKPOINT, "spec", tmp / f"worker{i}.log", max_running=args.concurrency)
               for i in range(2)]
    router = None
    try:
        for w in workers:
            w.wait_ready(timeout=600)
        port = free_port()
        router = subprocess.Popen([sys.executable, "-m", "sglang_router.launch_router", "--worker-urls",
                                   *[w.base_url for w in workers], "--host", "127.0.0.1", "--port", str(port),
                                   "--policy", "round_robin"], stdout=open(tmp / "router.log", "w"),
                                  stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        _wait_http(url, router)
        record("spec router x2", _online(url, "spec router x2", args, tmp / "router.json"))
    finally:
        if router is not None:
            router.terminate()
            router.wait(30)
        for w in workers:
            w.stop()
    base = details[0]["answers"]
    for row, det in zip(rows, details):
        row["answers_equal_one_worker"] = sum(a == b for a, b in zip(det["answers"], base)) / len(base)
        row["ratio_to_one_worker"] = row["output_tokens_per_s"] / rows[0]["output_tokens_per_s"]
    report = {"schema": SCHEMA, "kind": "scale-out", "environment": environment(),
              "settings": {"model": "demo", "algorithm": "spec", "concurrency": args.concurrency,
                           "requests": args.requests, "max_new_tokens": args.max_new_tokens,
                           "command": " ".join(["python", *sys.argv])},
              "summary": rows, "details": details,
              "notes": {"cores": "dp/tp ranks get one core each here (fast-dvlm serve splits the cores); the "
                                 "router's two servers share both"}}
    out = RESULTS / "bench_scale_out_cpu_demo.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
