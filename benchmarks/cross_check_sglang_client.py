"""Our bench client next to SGLang's own (`python -m sglang.bench_serving`) on one server.

    .venv-sglang/bin/python benchmarks/cross_check_sglang_client.py --algorithm spec --concurrency 1,16

Starts one `fast-dvlm serve --model demo --algorithm A` and writes one JSONL of held-out demo
chat requests (an image each, as data URLs; greedy; `max_tokens`), which both clients read:
ours (`fast-dvlm bench online --dataset FILE`) and SGLang's (`--backend sglang-oai-chat
--dataset-name openai --dataset-path FILE --disable-ignore-eos`: its default ignores EOS, ours
stops where the model stops). For each concurrency both run back to back, alternating which goes
first over `--repeats` rounds. Writes `benchmarks/results/cross_check_<algorithm>_cpu_demo.json`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SGLANG_KEYS = ("completed", "duration", "total_output_tokens", "total_output_tokens_retokenized", "output_throughput", "mean_ttft_ms", "median_ttft_ms",
               "p99_ttft_ms", "mean_itl_ms", "median_itl_ms", "p99_itl_ms", "mean_tpot_ms", "median_e2e_latency_ms",
               "p99_e2e_latency_ms")


def write_dataset(path: Path, n: int, max_tokens: int) -> None:
    from fast_dvlm_sglang.benchmarks.load import demo_requests

    with path.open("w") as f:
        for r in demo_requests(n, max_tokens):
            f.write(json.dumps({"messages": r.messages, "max_tokens": max_tokens, "temperature": 0.0}) + "\n")


def ours(base_url: str, dataset: Path, n: int, c: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "fast_dvlm_sglang.cli", "bench", "online", "--base-url", base_url, "--dataset",
           str(dataset), "--requests", str(n), "--concurrency", str(c), "--quiet", "--no-plots", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    row = json.loads(out.read_text())["summary"][0]
    return {"completed": row["requests"] - row["failed"], "duration": row["duration_s"],
            "total_output_tokens": row["output_tokens"], "output_throughput": row["output_tokens_per_s"],
            "mean_ttft_ms": row["ttft_ms"]["mean"], "median_ttft_ms": row["ttft_ms"]["p50"],
            "p99_ttft_ms": row["ttft_ms"]["p99"], "mean_itl_ms": row["itl_ms"]["mean"],
            "median_itl_ms": row["itl_ms"]["p50"], "p99_itl_ms": row["itl_ms"]["p99"],
            "mean_tpot_ms": row["tpot_ms"]["mean"], "median_e2e_latency_ms": row["e2e_latency_ms"]["p50"],
            "p99_e2e_latency_ms": row["e2e_latency_ms"]["p99"]}


def sglangs(base_url: str, model_dir: Path, dataset: Path, n: int, c: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "sglang.bench_serving", "--backend", "sglang-oai-chat", "--base-url", base_url,
           "--model", str(model_dir), "--tokenizer", str(model_dir), "--dataset-name", "openai", "--dataset-path",
           str(dataset), "--num-prompts", str(n), "--max-concurrency", str(c), "--disable-ignore-eos",
           "--output-file", str(out), "--disable-tqdm"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"sglang.bench_serving failed: {done.stderr[-2000:]}")
    row = json.loads(out.read_text().strip().splitlines()[-1])
    return {k: row.get(k) for k in SGLANG_KEYS}


def main() -> int:
    from fast_dvlm_sglang.config import resolve_model_dir
    from fast_dvlm_sglang.server_process import ServeProcess

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--algorithm", choices=["ar", "mdm", "spec"], default="spec")
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="cross-check-"))
    dataset = tmp / "requests.jsonl"
    write_dataset(dataset, args.requests, args.max_new_tokens)
    model_dir = resolve_model_dir("demo")
    server = ServeProcess(model_dir, args.algorithm, tmp / "server.log", max_running=max(levels))
    results = {}
    try:
        server.wait_ready(timeout=600)
        ours(server.base_url, dataset, 4, 4, tmp / "warm.json")  # warm-up
        for c in levels:
            runs = {"ours": [], "sglang": []}
            for i in range(args.repeats):
                order = ("ours", "sglang") if i % 2 == 0 else ("sglang", "ours")
                for who in order:
                    out = tmp / f"{who}-{c}-{i}.json"
                    runs[who].append(ours(server.base_url, dataset, args.requests, c, out) if who == "ours"
                                     else sglangs(server.base_url, model_dir, dataset, args.requests, c, out))
                    print(who, c, i, json.dumps({k: round(v, 1) for k, v in runs[who][-1].items() if v is not None}),
                          flush=True)
            results[str(c)] = runs
    finally:
        server.stop()
    report = {"what": "fast-dvlm bench online vs python -m sglang.bench_serving, same server, same requests",
              "algorithm": args.algorithm, "model": "demo", "requests": args.requests,
              "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "results": results,
              "command": " ".join(["python", *sys.argv])}
    out = RESULTS / f"cross_check_{args.algorithm}_cpu_demo.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
