"""GPU acceptance check: every algorithm, CUDA graphs on and off, on the demo model (bfloat16) and on
a random-weights checkpoint with the real Fast-dVLM 3B shapes; exits non-zero on a failure.

    benchmarks/gpu_smoke.sh                                  # the one command (= --device cuda)
    python benchmarks/gpu_smoke.py --device cpu --models demo --n 8    # CPU dry run (no graphs)

For each model, one `fast-dvlm serve` at a time (each takes the GPU's KV pool), in this order:
ar eager, ar graphs (SGLang's default decode CUDA graphs; eager = `-- --disable-cuda-graph`),
mdm eager, mdm graphs (likewise), spec eager (the default), spec graphs (`--spec-cuda-graph`).
Each serves the same prompts twice through SGLang's native /generate: one at a time (parity and
accepted lengths, free of batch-composition effects) and `--concurrency` at once (tokens/s and
batched graphs). Checks, each a FAIL if broken:

- every request answers (no crash, no HTTP error), every server starts;
- ar graphs == ar eager and spec (eager, graphs; one at a time and batched) == ar eager, greedy,
  tie-aware: equal, or parting where AR eager's top-logprob gap is within the noise bound, which is
  measured on both AR servers (decode steps vs a causal extend over the same tokens, x the safety
  factor; `fast_dvlm_sglang/decoding/parity.py`);
- spec accepted lengths with graphs == eager: per request answered alike, the same
  `meta_info["dllm_nfe"]` (forwards per emitted token, which fixes every round's accepted length).
  A difference with equal answers can only come from a draft argmax that flips (a near tie in the
  draft pass, which no server API exposes) or a graph bug, and needs a look either way;
- mdm graphs vs eager is reported (MDM is lossy: a confidence within noise of the threshold can
  commit differently), a FAIL only with --strict-mdm.

On the random checkpoint drafts are almost never accepted: tokens/NFE means nothing there, parity,
graphs and crashes do. Prints a table and writes `benchmarks/results/gpu_smoke_<device>.json`.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from fast_dvlm_sglang.server_parity import (
    Answer,
    ServerPrompt,
    answers,
    compare,
    measure_server_noise,
    tally,
)

RESULTS = Path(__file__).parent / "results"
CONFIGS = (("ar", False), ("ar", True), ("mdm", False), ("mdm", True), ("spec", False), ("spec", True))
MODELS = ("demo", "random-3b")
MAX_TOKENS = [160, 96, 64, 33, 160, 17, 128, 48]
SMALL_RANDOM = dict(text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, mrope_section=[2, 3, 3]),
                    vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, fullatt_block_indexes=[1]),
                    vocab_size=1024, max_shard_bytes=None)


# ---- what to serve --------------------------------------------------------------------------------
def serve_flags(algorithm: str, graphs: bool, device: str, dtype: str) -> tuple[list[str], list[str]]:
    """(`fast-dvlm serve` flags, SGLang flags after `--`) for one configuration."""
    if graphs and device != "cuda":
        raise ValueError("CUDA graphs need --device cuda")
    serve, sglang = ["--device", device], ["--dtype", dtype]
    if algorithm == "spec":
        serve += ["--spec-cuda-graph"] if graphs else []  # spec runs its rounds eagerly by default
        # Whole blocks in both: under graphs every round keeps the full canvas, so only pinned
        # rounds make eager and graph rounds (and their NFE) comparable one to one.
        serve += ["--draft-length", "31"]
    elif not graphs and device == "cuda":
        sglang += ["--disable-cuda-graph"]  # ar/mdm: SGLang captures decode graphs by default
    return serve, sglang


def model_dir(name: str, cache: Path) -> Path:
    from fast_dvlm_sglang.demo import DEMO_CHECKPOINT
    from fast_dvlm_sglang.random_checkpoint import ensure_random_checkpoint

    if name == "demo":
        return DEMO_CHECKPOINT
    if name == "random-3b":
        return ensure_random_checkpoint(cache / "fast_dvlm_random_3b", seed=0)
    if name == "random-small":  # the same builder at toy size (CPU dry runs, tests)
        return ensure_random_checkpoint(cache / "fast_dvlm_random_small", seed=0, **SMALL_RANDOM)
    return Path(name)  # a checkpoint directory


def prompts(processor, seed: int, n: int, max_tokens=MAX_TOKENS) -> list[ServerPrompt]:
    """Held-out demo conversations (images and text), rendered with the checkpoint's template."""
    from fast_dvlm_sglang.demo import shapes
    from fast_dvlm_sglang.processing import render_chat

    out = []
    for i, s in enumerate(shapes.make_split(seed, n)):
        url = None
        if s.image is not None:
            buf = io.BytesIO()
            s.image.save(buf, format="PNG")
            url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        out.append(ServerPrompt(render_chat(processor, s.prompt_messages, add_generation_prompt=True), url,
                                max_tokens[i % len(max_tokens)]))
    return out


# ---- one configuration --------------------------------------------------------------------------------
@dataclass
class Run:
    model: str
    algorithm: str
    graphs: bool
    startup_s: float | None = None
    seq: list[Answer] = field(default_factory=list)  # one request at a time
    batch: list[Answer] = field(default_factory=list)  # --concurrency at once
    seq_s: float = 0.0
    batch_s: float = 0.0
    noise: object = None  # ar: NoiseMeasurement
    error: str | None = None

    @property
    def name(self) -> str:
        return f"{self.algorithm} {'graphs' if self.graphs else 'eager'}"


def run_config(model: str, path: Path, algorithm: str, graphs: bool, args, server_prompts, calibration, tokenize,
               log_dir: Path) -> Run:
    from fast_dvlm_sglang.server_process import ServeProcess

    run = Run(model, algorithm, graphs)
    serve, sglang = serve_flags(algorithm, graphs, args.device, args.dtype)
    log = log_dir / f"{model}_{algorithm}_{'graphs' if graphs else 'eager'}.log"
    server = ServeProcess(path, algorithm, log, max_running=args.concurrency, serve_args=serve, sglang_args=sglang)
    try:
        run.startup_s = server.wait_ready(timeout=args.startup_timeout)
        top_k = args.top_k if algorithm == "ar" else 0
        if algorithm == "ar":
            run.noise = measure_server_noise(server, calibration, tokenize, top_k=args.top_k,
                                             source=f"{model} {run.name} {args.dtype}: decode steps vs causal extend")
        start = time.perf_counter()
        run.seq = answers(server, server_prompts, concurrency=1, top_k=top_k)
        run.seq_s = time.perf_counter() - start
        start = time.perf_counter()
        run.batch = answers(server, server_prompts, concurrency=args.concurrency, top_k=top_k)
        run.batch_s = time.perf_counter() - start
    except Exception as e:  # a crash is a result: report it, go on with the next configuration
        run.error = f"{type(e).__name__}: {e}"[:500]
        tail = log.read_text()[-2000:] if log.is_file() else ""
        print(f"[{model} {run.name}] FAILED: {run.error}\n{tail}", file=sys.stderr)
        traceback.print_exc()
    finally:
        server.stop()
    return run


# ---- checks (pure: unit-tested on CPU) -----------------------------------------------------------------
def _tokens(ans: list[Answer]) -> int:
    return sum(len(a.output_ids) for a in ans)


def tokens_per_nfe(ans: list[Answer]) -> float | None:
    nfe = [a.nfe[-1] for a in ans if a.nfe]
    return _tokens(ans) / sum(nfe) if nfe and len(nfe) == len(ans) and sum(nfe) else None


def nfe_mismatches(eager: list[Answer], graphs: list[Answer]) -> tuple[int, int, list[int]]:
    """(requests answered alike, of which with different dllm_nfe, their indices)."""
    alike, bad = 0, []
    for i, (a, b) in enumerate(zip(eager, graphs)):
        if a.output_ids == b.output_ids:
            alike += 1
            if a.nfe != b.nfe:
                bad.append(i)
    return alike, len(bad), bad


def evaluate(runs: list[Run], *, strict_mdm: bool = False) -> tuple[list[dict], list[str]]:
    """Table rows (one per model x configuration) and the list of failures."""
    rows, failures = [], []
    for model in dict.fromkeys(r.model for r in runs):
        by = {(r.algorithm, r.graphs): r for r in runs if r.model == model}
        ref = by.get(("ar", False))
        ar_runs = [r for (a, _), r in by.items() if a == "ar" and r.noise is not None]
        bound = max((r.noise.bound for r in ar_runs), default=None)
        for (algorithm, graphs), run in by.items():
            row = {"model": model, "config": run.name, "startup_s": run.startup_s,
                   "seq_tokens_per_s": _tokens(run.seq) / run.seq_s if run.seq_s else None,
                   "batch_tokens_per_s": _tokens(run.batch) / run.batch_s if run.batch_s else None,
                   "tokens_per_nfe": tokens_per_nfe(run.seq), "parity": "-", "graphs_vs_eager": "-", "status": "ok"}
            problems = []
            if run.error:
                problems.append(f"error: {run.error}")
            elif algorithm in ("ar", "spec"):
                if ref is None or ref.error or bound is None:
                    problems.append("no AR eager reference to compare with")
                else:
                    counts = {k: tally(compare(ref.seq, getattr(run, k), bound)) for k in ("seq", "batch")}
                    row["parity"] = " | ".join(f"{c['equal']}/{c['ties']}/{c['failures']}" for c in counts.values())
                    row["parity_counts"] = counts
                    for k, c in counts.items():
                        if c["failures"]:
                            verdicts = compare(ref.seq, getattr(run, k), bound)
                            bad = [f"#{i}: {v}" for i, v in enumerate(verdicts) if not v.ok]
                            problems.append(f"{k} answers differ from AR eager beyond a near tie: {bad[:3]}")
            if not run.error and graphs and algorithm in ("spec", "mdm"):
                eager = by.get((algorithm, False))
                if eager is None or eager.error:
                    problems.append("no eager run to compare the graphs with")
                elif algorithm == "spec":
                    alike, n_bad, bad = nfe_mismatches(eager.seq, run.seq)
                    row["graphs_vs_eager"] = f"nfe {alike - n_bad}/{alike} alike"
                    if n_bad:
                        problems.append(f"accepted lengths differ with graphs on requests {bad} (same answers)")
                else:
                    same = sum(a.output_ids == b.output_ids for a, b in zip(eager.seq, run.seq))
                    row["graphs_vs_eager"] = f"{same}/{len(run.seq)} equal"
                    if same < len(run.seq) and strict_mdm:
                        problems.append(f"mdm answers differ with graphs on {len(run.seq) - same} requests")
            if problems:
                row["status"] = "FAIL"
                failures += [f"{model} {run.name}: {p}" for p in problems]
            row["noise_bound"] = run.noise.bound if run.noise is not None else None
            rows.append(row)
    return rows, failures


def format_table(rows: list[dict]) -> str:
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    head = f"{'model':<12} {'config':<12} {'start s':>7} {'seq tok/s':>9} {'batch tok/s':>11} {'tok/NFE':>7} " \
           f"{'vs AR eager seq | batch':>26} {'graphs vs eager':>16} {'noise bound':>11} status"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:<12} {r['config']:<12} {num(r['startup_s'], '7.0f')} "
                     f"{num(r['seq_tokens_per_s'], '9.1f')} {num(r['batch_tokens_per_s'], '11.1f')} "
                     f"{num(r['tokens_per_nfe'], '7.2f')} {r['parity']:>26} {r['graphs_vs_eager']:>16} "
                     f"{num(r.get('noise_bound'), '11.3g')} {r['status']}")
    lines.append("vs AR eager: equal/near ties/real divergences, against AR eager's answers one at a time, for this "
                 "configuration's answers one at a time | batched")
    return "\n".join(lines)


# ---- main ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--models", default=",".join(MODELS),
                    help="comma-separated: demo, random-3b, random-small, or checkpoint directories")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--n", type=int, default=32, help="prompts per configuration")
    ap.add_argument("--seed", type=int, default=4321, help="held-out demo split of the prompts")
    ap.add_argument("--calibration", type=int, default=6, help="prompts to measure the noise on (another split)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--configs", default=None, help="e.g. ar:eager,spec:graphs (default: all; eager only on CPU)")
    ap.add_argument("--strict-mdm", action="store_true", help="fail when MDM answers differ with graphs")
    ap.add_argument("--cache", type=Path, default=Path("/tmp"), help="where the random checkpoints are built")
    ap.add_argument("--startup-timeout", type=float, default=1200)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    from fast_dvlm_sglang.tokenizer import load_processor

    if args.configs:
        configs = [(a, g == "graphs") for a, g in (c.split(":") for c in args.configs.split(","))]
    else:
        configs = [c for c in CONFIGS if args.device == "cuda" or not c[1]]
    if args.device == "cpu" and any(g for _, g in configs):
        ap.error("CUDA graphs need --device cuda")
    log_dir = RESULTS / "logs" / "gpu_smoke"
    log_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for model in args.models.split(","):
        path = model_dir(model, args.cache)
        processor = load_processor(path)
        server_prompts = prompts(processor, args.seed, args.n)
        calibration = prompts(processor, args.seed + 1, args.calibration, [64])
        tokenize = lambda t, p=processor: p.tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
        for algorithm, graphs in configs:
            print(f"[{model}] {algorithm} {'graphs' if graphs else 'eager'} ...", flush=True)
            runs.append(run_config(model, path, algorithm, graphs, args, server_prompts, calibration, tokenize,
                                   log_dir))
    rows, failures = evaluate(runs, strict_mdm=args.strict_mdm)
    print(format_table(rows))
    out = args.out or RESULTS / f"gpu_smoke_{args.device}.json"
    out.write_text(json.dumps({"device": _device_name(args.device), "dtype": args.dtype, "n": args.n,
                               "command": " ".join(sys.argv), "rows": rows, "failures": failures,
                               "noise": {f"{r.model} {r.name}": r.noise.summary() for r in runs if r.noise}},
                              indent=2, default=str) + "\n")
    print(out)
    for f in failures:
        print(f"FAIL {f}")
    print("gpu_smoke:", "FAILED" if failures else "passed")
    return 1 if failures else 0


def _device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    import os
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


if __name__ == "__main__":
    raise SystemExit(main())
