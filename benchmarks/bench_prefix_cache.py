"""The radix cache and chunked prefill under AR, MDM and spec, measured in one run.

    .venv-sglang/bin/python benchmarks/bench_prefix_cache.py --model demo

For each algorithm, one `fast-dvlm serve` process at a time (same flags except `--algorithm`,
`--enable-cache-report`), with the `openai` client and SGLang's own benchmark client:
- time to first token, cold then warm: a shared ~2k-token system prompt, then a new image and a
  question, sent `--repeats` times one after another (streamed; TTFT = first content chunk);
- a five-turn conversation with an image in turn one: prompt tokens computed per turn
  (prompt tokens - cached tokens, `usage.prompt_tokens_details.cached_tokens`);
- `python -m sglang.bench_serving` on its generated-shared-prefix dataset at concurrency 16
  (the KV-pool issue's command: 16 prompts of ~1.5k tokens, ~3x the CPU pool), unless
  `--skip-load`.
Writes `benchmarks/results/prefix_cache_<device>_<model>.json`.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from fast_dvlm_sglang.config import resolve_model_dir
from fast_dvlm_sglang.server_process import ServeProcess

RESULTS = Path(__file__).parent / "results"
ALGORITHMS = ("ar", "mdm", "spec")
QUESTIONS = ["What shape is in the image?", "What color is the shape?", "Is the shape big?",
             "Where is the shape?", "What is in the picture?"]
COLORS = ["red", "green", "blue", "black", "orange", "purple"]


def _image_url(i: int) -> str:
    import base64
    import io

    from PIL import Image, ImageDraw

    im = Image.new("RGB", (112, 112), "white")
    ImageDraw.Draw(im).ellipse([10 + i, 10, 100, 90 - i], fill=COLORS[i % len(COLORS)])
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _system_prompt(tokenizer, tokens: int) -> str:
    words = "You describe simple shapes on a white background: circles, squares and triangles, their color, size and place. "
    text = words
    while len(tokenizer(text)["input_ids"]) < tokens:
        text += words
    return text


def _stream(client, model, messages, max_tokens):
    """(TTFT s, total s, usage) of one streamed greedy chat request."""
    start, first, usage = time.perf_counter(), None, None
    for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                temperature=0, stream=True,
                                                stream_options={"include_usage": True}):
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter()
        if chunk.usage is not None:
            usage = chunk.usage
    end = time.perf_counter()
    return (first or end) - start, end - start, usage


def _cached(usage) -> int:
    details = getattr(usage, "prompt_tokens_details", None)
    return int(getattr(details, "cached_tokens", 0) or 0)


def ttft(client, model, system: str, repeats: int, max_tokens: int) -> list[dict]:
    rows = []
    for i in range(repeats):
        messages = [{"role": "system", "content": system},
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _image_url(i)}},
                                                 {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]}]}]
        first, total, usage = _stream(client, model, messages, max_tokens)
        rows.append({"ttft_s": round(first, 3), "latency_s": round(total, 3), "prompt_tokens": usage.prompt_tokens,
                     "cached_tokens": _cached(usage)})
    return rows


def five_turns(client, model, max_tokens: int) -> list[dict]:
    messages, rows = [], []
    for turn, question in enumerate(QUESTIONS):
        content = question if turn else [{"type": "image_url", "image_url": {"url": _image_url(7)}},
                                         {"type": "text", "text": question}]
        messages.append({"role": "user", "content": content})
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
        cached = _cached(r.usage)
        answer = r.choices[0].message.content
        rows.append({"prompt_tokens": r.usage.prompt_tokens, "cached_tokens": cached,
                     "computed_prompt_tokens": r.usage.prompt_tokens - cached, "answer": answer,
                     "finish_reason": r.choices[0].finish_reason})
        messages.append({"role": "assistant", "content": answer})
    return rows


def shared_prefix_load(server: ServeProcess, model: str, tokenizer_dir: Path, timeout: int,
                       concurrency: int = 16) -> dict:
    """SGLang's own client on its generated-shared-prefix dataset (the KV-pool and the
    adaptive-speculation issues' command): 2 groups x 8 random-token prompts of ~1.1k tokens."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.jsonl"
        cmd = [sys.executable, "-m", "sglang.bench_serving", "--backend", "sglang-oai-chat", "--base-url",
               server.base_url, "--model", model, "--tokenizer", str(tokenizer_dir), "--dataset-name",
               "generated-shared-prefix", "--gsp-num-groups", "2", "--gsp-prompts-per-group", "8",
               "--gsp-system-prompt-len", "1024", "--gsp-question-len", "32", "--gsp-output-len", "48",
               "--max-concurrency", str(concurrency), "--output-file", str(out), "--disable-tqdm"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"completed": False, "why": f"client timeout {timeout} s", "server_healthy_after": server.healthy()}
        if proc.returncode != 0 or not out.is_file():
            return {"completed": False, "why": proc.stderr[-2000:], "server_healthy_after": server.healthy()}
        res = json.loads(out.read_text().strip().splitlines()[-1])
    keys = ("completed", "duration", "total_input_tokens", "total_output_tokens", "output_throughput",
            "mean_ttft_ms", "median_ttft_ms", "mean_tpot_ms", "mean_e2e_latency_ms")
    return {**{k: res.get(k) for k in keys}, "server_healthy_after": server.healthy(), "command": " ".join(cmd[1:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--algorithms", nargs="+", choices=ALGORITHMS, default=list(ALGORITHMS))
    ap.add_argument("--prefix-tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--skip-load", action="store_true")
    ap.add_argument("--load-timeout", type=int, default=1200)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from fast_dvlm_sglang.tokenizer import load_tokenizer

    model_dir = resolve_model_dir(args.model)
    system = _system_prompt(load_tokenizer(model_dir), args.prefix_tokens)
    report = {"what": __doc__.split("\n\n")[0], "date": str(date.today()), "model": args.model,
              "device": f"CPU ({platform.processor() or platform.machine()}), float32, torch_native attention",
              "prefix_tokens": args.prefix_tokens, "max_tokens": args.max_tokens, "algorithms": {}}
    log_dir = Path(tempfile.mkdtemp(prefix="bench_prefix_cache_"))
    for algorithm in args.algorithms:
        server = ServeProcess(model_dir, algorithm, log_dir / f"{algorithm}.log", sglang_args=["--enable-cache-report"])
        try:
            server.wait_ready()
            client = server.client(timeout=1800)
            model = client.models.list().data[0].id
            row = {"ttft": ttft(client, model, system, args.repeats, args.max_tokens),
                   "five_turns": five_turns(client, model, args.max_tokens)}
            if not args.skip_load:
                row["shared_prefix_load_c16"] = shared_prefix_load(server, model, model_dir, args.load_timeout)
            report["algorithms"][algorithm] = row
            print(algorithm, json.dumps(row), flush=True)
        finally:
            server.stop()
    rows = report["algorithms"]
    if "ar" in rows:
        warm_ar = min(r["ttft_s"] for r in rows["ar"]["ttft"][1:])
        report["warm_ttft_vs_ar"] = {a: round(min(r["ttft_s"] for r in row["ttft"][1:]) / warm_ar, 3)
                                     for a, row in rows.items()}
        report["answers_equal_ar"] = {
            a: [t["answer"] for t in row["five_turns"]] == [t["answer"] for t in rows["ar"]["five_turns"]]
            for a, row in rows.items()}
        report["computed_prompt_tokens_equal_ar"] = {
            a: [t["computed_prompt_tokens"] for t in row["five_turns"]] ==
               [t["computed_prompt_tokens"] for t in rows["ar"]["five_turns"]] for a, row in rows.items()}
    out = args.out or RESULTS / f"prefix_cache_cpu_{Path(str(args.model)).name}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
