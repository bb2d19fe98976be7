"""AR vs MDM vs spec through SGLang's OpenAI server (our plugin), measured in one run.

    .venv-sglang/bin/python benchmarks/bench_serving.py --model demo --n 32 --concurrency 16

For each algorithm, one `fast-dvlm serve` process (same flags except `--algorithm`) on held-out
demo prompts (shapes split of `--seed`, not a training seed):
- sequential: one request at a time with the `openai` client: latency and single-request tokens/s;
- concurrent: all prompts at once from `--concurrency` threads: aggregate tokens/s;
- tokens/NFE, NFE counted after the prompt's prefill as the reference decoders count it: spec
  from the server's `meta_info["dllm_nfe"]` (OpenAI `return_meta_info`); AR one forward per token after
  the first; MDM from the PyTorch reference decoder on the same prompts (the server's MDM
  answers equal it token for token, tests/sglang/test_server.py; SGLang reports no MDM NFE);
- exact-match accuracy against the dataset answers, and whether every algorithm's answer equals AR's.
Writes `benchmarks/results/serving_<device>_<model>.json` and a `.png` next to it.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures as cf
import io
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

from openai import OpenAI
from tqdm import tqdm

from fast_dvlm_sglang.config import resolve_model_dir
from fast_dvlm_sglang.demo.shapes import answers_match, make_split
from fast_dvlm_sglang.server_process import ServeProcess

RESULTS = Path(__file__).parent / "results"
ALGORITHMS = ("ar", "mdm", "spec")


def _data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def openai_messages(messages: list[dict]) -> list[dict]:
    """Our dataset's messages (PIL images) as OpenAI chat messages (image data URLs)."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [{"type": "image_url", "image_url": {"url": _data_url(p["image"])}}
                       if p.get("type") == "image" else p for p in content]
        out.append({"role": m["role"], "content": content})
    return out


def _chat(client: OpenAI, model: str, messages, max_tokens: int):
    """One greedy chat completion: (text, completion tokens, seconds, the request's NFE or None).
    Every algorithm asks for SGLang's meta_info, so all pay the same; only spec reports NFE."""
    start = time.perf_counter()
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                       extra_body={"return_meta_info": True})
    seconds = time.perf_counter() - start
    nfe = (r.choices[0].model_extra.get("meta_info") or {}).get("dllm_nfe")
    return r.choices[0].message.content, r.usage.completion_tokens, seconds, nfe[-1] if nfe else None


def reference_mdm_nfe(model_dir: Path, samples, max_tokens: int, threshold: float) -> tuple[int, int]:
    from fast_dvlm_sglang.decoding import GenerationConfig, Prompt, generate
    from fast_dvlm_sglang.model import FastDVLMForConditionalGeneration
    from fast_dvlm_sglang.processing import encode_chat
    from fast_dvlm_sglang.tokenizer import load_processor

    model = FastDVLMForConditionalGeneration.from_pretrained(model_dir).eval()
    proc = load_processor(model_dir)
    cfg = GenerationConfig("mdm", max_new_tokens=max_tokens, threshold=threshold)
    tokens = nfe = 0
    for s in samples:
        enc = encode_chat(proc, s.prompt_messages)
        res = generate(model, Prompt(enc.input_ids, enc.pixel_values, enc.image_grid_thw), cfg)
        tokens += len(res.token_ids)
        nfe += res.nfe
    return tokens, nfe


def run_algorithm(args, algorithm: str, model_dir: Path, samples, log_dir: Path) -> dict:
    server = ServeProcess(model_dir, algorithm, log_dir / f"{algorithm}.log", max_running=args.concurrency)
    try:
        startup = server.wait_ready(timeout=600)
        client = server.client(timeout=600)
        served = client.models.list().data[0].id
        messages = [openai_messages(s.prompt_messages) for s in samples]
        _chat(client, served, messages[0], 8)  # warm-up, not timed

        answers, tokens, latencies, nfe = [], 0, [], 0
        for m in tqdm(messages, desc=f"{algorithm} sequential"):
            text, n, dt, f = _chat(client, served, m, args.max_tokens)
            answers.append(text)
            tokens += n
            latencies.append(dt)
            nfe += f or 0
        start = time.perf_counter()
        with cf.ThreadPoolExecutor(args.concurrency) as pool:
            conc = list(pool.map(lambda m: _chat(client, served, m, args.max_tokens), messages))
        conc_seconds = time.perf_counter() - start
        conc_tokens = sum(c[1] for c in conc)

        row = {
            "startup_s": startup,
            "completion_tokens": tokens,
            "sequential_tokens_per_s": tokens / sum(latencies),
            "mean_latency_s": sum(latencies) / len(latencies),
            "p90_latency_s": sorted(latencies)[int(0.9 * (len(latencies) - 1))],
            "concurrent_tokens_per_s": conc_tokens / conc_seconds,
            "concurrent_equals_sequential": [c[0] for c in conc] == answers,
            "accuracy": sum(answers_match(a, s.answer) for a, s in zip(answers, samples)) / len(samples),
        }
        if algorithm == "ar":
            row.update(tokens_per_nfe=tokens / (tokens - len(samples)), nfe_source="one forward per token after the first")
        elif algorithm == "spec":
            row.update(tokens_per_nfe=tokens / nfe, nfe_source="server meta_info dllm_nfe")
        return row, answers
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--seed", type=int, default=4321)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--algorithms", nargs="+", choices=ALGORITHMS, default=list(ALGORITHMS))
    args = ap.parse_args()

    model_dir = resolve_model_dir(args.model)
    samples = make_split(args.seed, args.n)
    name = "demo" if args.model == "demo" else Path(model_dir).name
    log_dir = RESULTS / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    rows, answers = {}, {}
    for algorithm in args.algorithms:
        rows[algorithm], answers[algorithm] = run_algorithm(args, algorithm, model_dir, samples, log_dir)
    if "mdm" in rows:
        t, nfe = reference_mdm_nfe(model_dir, samples, args.max_tokens, args.threshold)
        rows["mdm"].update(tokens_per_nfe=t / nfe, nfe_source="PyTorch reference decoder, same prompts")
    for algorithm, row in rows.items():
        if "ar" in rows:
            row["equals_ar"] = answers[algorithm] == answers["ar"]
            for key in ("sequential_tokens_per_s", "concurrent_tokens_per_s"):
                row[key.replace("tokens_per_s", "speedup_vs_ar")] = row[key] / rows["ar"][key]

    cpu = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    device = "cpu" if not _has_cuda() else "cuda"
    report = {"benchmark": "sglang_serving", "model": name, "device": cpu if device == "cpu" else _gpu_name(),
              "date": date.today().isoformat(), "n": args.n, "seed": args.seed,
              "concurrency": args.concurrency, "max_tokens": args.max_tokens,
              "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "results": rows}
    out = RESULTS / f"serving_{device}_{name}.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out)
    print(f"{'algo':>5} {'tok/NFE':>8} {'seq tok/s':>10} {'conc tok/s':>11} {'latency':>8} {'acc':>5} {'=AR':>4}")
    for algorithm, r in rows.items():
        print(f"{algorithm:>5} {r['tokens_per_nfe']:8.2f} {r['sequential_tokens_per_s']:10.1f} "
              f"{r['concurrent_tokens_per_s']:11.1f} {r['mean_latency_s']:8.3f} {r['accuracy']:5.2f} "
              f"{str(r.get('equals_ar', '-')):>4}")
    _plot(rows, report, out.with_suffix(".png"))
    print(out)


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


def _plot(rows: dict, report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, axes = plt.subplots(1, 3, figsize=(11, 3))
    for ax, key, title in zip(axes, ("tokens_per_nfe", "sequential_tokens_per_s", "concurrent_tokens_per_s"),
                              ("tokens / NFE", "tokens/s, 1 request", f"tokens/s, {report['concurrency']} concurrent")):
        ax.bar(names, [rows[a][key] for a in names])
        ax.set_title(title)
    fig.suptitle(f"{report['model']} through SGLang on {report['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
