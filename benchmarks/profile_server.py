"""Where a served configuration's time goes: py-spy on SGLang's scheduler process under load.

    .venv-sglang/bin/python benchmarks/profile_server.py --algorithm spec --concurrency 16

Starts `fast-dvlm serve --model demo --algorithm A`, warms it up, then drives it with the bench
client (`load.py`, the demo prompts) at `--concurrency` while py-spy samples the scheduler
process (the one process that runs batching, our hooks and the model forward; `--idle` samples
are dropped, so what is left is busy time). Each sampled stack is put in one category:

- `vision encoder`: the image tower (SGLang's Qwen2.5-VL vision blocks), everything under it;
- `attention`: the attention backend (SGLang's torch_native / triton backends, our CPU extend
  attention, our Triton kernel, the KV writes);
- `model forward (other)`: the rest of the model's forward (linears, norms, RoPE, LM head);
- `our round (host)`: our plugin's code outside the forward (the round's drafting and
  acceptance tensor work, commits, the draft policy, grammars, metrics);
- `sglang scheduling`: SGLang's batch building, KV allocation, radix cache, output streaming;
- `other`: the event loop, ZMQ, anything else.
A sample goes to the category of its innermost frame that has one (our AROUND hooks wrap SGLang's
scheduler functions, so nearly every stack passes through a frame of ours).

Writes `benchmarks/results/profile_<algorithm>_c<N>_<device>_demo.json` (shares, the top
functions by self time) and the collapsed stacks next to it (`.collapsed.txt.gz`, the input of
any flame-graph tool: `inferno-flamegraph`, speedscope, `flamegraph.pl`).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

CATEGORIES = (
    ("vision encoder", ("get_image_feature", "layers/attention/vision.py")),
    ("attention", ("torch_native_backend.py", "cpu_attention.py", "triton_backend.py", "block_attention.py",
                   "triton_attention.py", "radix_attention.py", "mem_cache/memory_pool.py")),
    ("model forward (other)", ("models/qwen2_5_vl.py", "models/qwen2.py", "sglang_plugin/model.py",
                               "layers/linear.py", "layers/layernorm.py", "rotary_embedding", "logits_processor.py",
                               "model_executor/model_runner.py", "torch/nn/modules/", "layers/activation.py",
                               "layers/vocab_parallel_embedding.py")),
    ("our round (host)", ("fast_dvlm_sglang/",)),
    ("sglang scheduling", ("sglang/srt/managers/", "sglang/srt/mem_cache/", "sglang/srt/dllm/",
                           "sglang/srt/model_executor/", "sglang/srt/sampling/", "sglang/srt/observability/")),
)


def classify(stack: str) -> str:
    """The category of the innermost frame that has one (our hooks wrap SGLang's functions, so
    every scheduler stack passes through a frame of ours: the leaf-most match decides), except
    that everything under the image tower is the vision encoder's: its linears, norms and
    attention are the tower's cost, not the language model's."""
    vision = CATEGORIES[0]
    if any(n in stack for n in vision[1]):
        return vision[0]
    for frame in reversed(stack.split(";")):
        for name, needles in CATEGORIES:
            if any(n in frame for n in needles):
                return name
    return "other"


def _scheduler_pid(root_pid: int) -> int:
    import psutil

    for child in psutil.Process(root_pid).children(recursive=True):
        try:
            if "scheduler" in " ".join(child.cmdline()).lower() or "scheduler" in child.name().lower():
                return child.pid
        except psutil.Error:
            continue
    raise RuntimeError("no SGLang scheduler process found under the server")


def _short_paths(text: str) -> str:
    """Frame file names relative to site-packages and to the repo (the categories' needles match
    either form)."""
    prefixes = {str(Path(p).resolve()) + "/" for p in sys.path if "site-packages" in p}
    prefixes.add(str(Path(__file__).resolve().parents[1]) + "/")
    for prefix in sorted(prefixes, key=len, reverse=True):
        text = text.replace(prefix, "")
    return text


def summarize_collapsed(text: str, top: int = 15) -> dict:
    """Shares per category and the functions with the most self samples, from py-spy's collapsed
    (`--format raw`) output: `frame;frame;... count` per line, leaf last."""
    per_cat, self_time, total = collections.Counter(), collections.Counter(), 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        per_cat[classify(stack)] += n
        self_time[stack.rsplit(";", 1)[-1]] += n
    return {"busy_samples": total,
            "share": {k: v / total for k, v in per_cat.most_common()} if total else {},
            "top_self": [{"frame": f, "share": n / total} for f, n in self_time.most_common(top)] if total else []}


def main() -> int:
    from fast_dvlm_sglang.benchmarks.load import demo_requests, run_load
    from fast_dvlm_sglang.config import resolve_model_dir
    from fast_dvlm_sglang.server_process import ServeProcess

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--algorithm", choices=["ar", "mdm", "spec"], default="spec")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    ap.add_argument("--workload", choices=["demo", "gsp"], default="demo",
                    help="demo: the demo prompts (load.py); gsp: SGLang's bench_serving on its generated-shared-"
                         "prefix dataset (random-token prompts, the adaptive-speculation issue's command)")
    ap.add_argument("--serve-args", default="", help="more `fast-dvlm serve` flags, e.g. '--draft-length 0'")
    ap.add_argument("--tag", default="", help="suffix of the output file name")
    args = ap.parse_args()
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        sys.exit("profile_server: py-spy not found (it is in constraints-sglang.txt: make venv-sglang)")
    tmp = Path(tempfile.mkdtemp(prefix="profile-"))
    model_dir = resolve_model_dir("demo")
    server = ServeProcess(model_dir, args.algorithm, tmp / "server.log", max_running=args.concurrency,
                          serve_args=args.serve_args.split())
    try:
        server.wait_ready(timeout=600)
        client = server.client(timeout=900)
        model = client.models.list().data[0].id
        requests = demo_requests(args.requests, args.max_new_tokens)
        run_load(client, model, requests[:4], 4, progress=False)  # warm-up
        pid = _scheduler_pid(server.proc.pid)
        raw = tmp / "stacks.txt"
        # One sampler for as long as the load runs (SIGINT makes py-spy write its file and exit).
        spy = subprocess.Popen([pyspy, "record", "-p", str(pid), "-r", str(args.rate), "-f", "raw", "-o", str(raw),
                                "--full-filenames", "--nonblocking"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
        time.sleep(1.0)
        if args.workload == "gsp":
            sys.path.insert(0, str(Path(__file__).parent))
            from bench_prefix_cache import shared_prefix_load

            res = shared_prefix_load(server, model, model_dir, timeout=1800, concurrency=args.concurrency)
            if not res.get("completed"):
                sys.exit(f"profile_server: the load did not complete: {res.get('why')}")
            n_requests, duration, tokens = res["completed"], res["duration"], res["total_output_tokens"]
        else:
            records, duration = run_load(client, model, requests, args.concurrency, progress=False)
            n_requests, tokens = len(records), sum(r.output_tokens for r in records if r.ok)
        spy.send_signal(2)
        spy.wait(timeout=120)
    finally:
        server.stop()
    text = _short_paths(raw.read_text())
    summary = summarize_collapsed(text)
    workload = "" if args.workload == "demo" else f"_{args.workload}"
    out = RESULTS / f"profile_{args.algorithm}{args.tag}{workload}_c{args.concurrency}_cpu_demo.json"
    report = {"what": "py-spy samples of SGLang's scheduler process under load (busy samples only)",
              "device": f"CPU ({platform.processor() or platform.machine()})", "algorithm": args.algorithm,
              "concurrency": args.concurrency, "workload": args.workload, "serve_args": args.serve_args,
              "requests": n_requests, "output_tokens": tokens,
              "duration_s": duration, "output_tokens_per_s": tokens / duration, "rate_hz": args.rate,
              "categories": {name: list(needles) for name, needles in CATEGORIES}, **summary,
              "busy_samples_per_output_token": summary["busy_samples"] / max(1, tokens),
              "command": " ".join(["python", *sys.argv])}
    out.write_text(json.dumps(report, indent=1) + "\n")
    # Flame-graph input (inferno-flamegraph, speedscope, flamegraph.pl), gzipped.
    with gzip.open(out.with_suffix(".collapsed.txt.gz"), "wt") as f:
        f.write(text)
    print(json.dumps({k: report[k] for k in ("output_tokens_per_s", "busy_samples", "share")}, indent=1))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
