"""The client side of a serving benchmark: datasets of chat requests, and streaming OpenAI chat
completions sent at a fixed concurrency, timed per chunk (`serving_metrics.RequestRecord`)."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .serving_metrics import RequestRecord


class DatasetError(ValueError):
    pass


@dataclass(frozen=True)
class BenchRequest:
    messages: list  # OpenAI chat messages
    max_tokens: int
    answer: str | None = None  # the expected answer, where the dataset has one (accuracy)


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


def demo_requests(n: int, max_tokens: int, seed: int = 4321) -> list[BenchRequest]:
    """Held-out demo prompts (the shapes task, an image each; `seed` is not a training seed)."""
    from fast_dvlm_sglang.demo.shapes import make_split

    return [BenchRequest(openai_messages(s.prompt_messages), max_tokens, s.answer) for s in make_split(seed, n)]


def jsonl_requests(path: Path, n: int | None, max_tokens: int) -> list[BenchRequest]:
    """A JSONL file, one request per line: {"messages": [...]} (OpenAI chat) or {"prompt": "..."},
    optionally "max_tokens" and "answer". Errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"--dataset {path}: no such file")
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"--dataset {path}:{i}: not JSON ({e.msg})") from None
        if not isinstance(item, dict):
            raise DatasetError(f"--dataset {path}:{i}: expected an object")
        if isinstance(item.get("messages"), list) and item["messages"]:
            messages = item["messages"]
        elif isinstance(item.get("prompt"), str) and item["prompt"]:
            messages = [{"role": "user", "content": item["prompt"]}]
        else:
            raise DatasetError(f"--dataset {path}:{i}: needs a non-empty 'messages' list or 'prompt' string")
        mt = item.get("max_tokens", max_tokens)
        if isinstance(mt, bool) or not isinstance(mt, int) or mt < 1:
            raise DatasetError(f"--dataset {path}:{i}: max_tokens must be a positive integer")
        answer = item.get("answer")
        out.append(BenchRequest(messages, mt, answer if isinstance(answer, str) else None))
    if not out:
        raise DatasetError(f"--dataset {path}: no requests")
    return out[:n] if n else out


def stream_chat(client, model: str, request: BenchRequest, *, temperature: float = 0.0):
    """One streaming chat completion, timed per content chunk."""
    start = time.perf_counter()
    chunks, parts, usage = [], [], None
    try:
        stream = client.chat.completions.create(model=model, messages=request.messages,
                                                max_tokens=request.max_tokens, temperature=temperature,
                                                stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices or ():
                text = getattr(choice.delta, "content", None)
                if text:
                    chunks.append(now)
                    parts.append(text)
    except Exception as e:  # a failed request is a result (counted as failed), not a crash
        return RequestRecord(start=start, end=time.perf_counter(), error=f"{type(e).__name__}: {e}"[:300])
    end = time.perf_counter()
    if usage is None:
        return RequestRecord(start=start, end=end, error="the stream carried no usage")
    return RequestRecord(start=start, end=end, first_content=chunks[0] if chunks else None,
                         chunk_times=tuple(chunks), output_tokens=usage.completion_tokens,
                         prompt_tokens=usage.prompt_tokens, text="".join(parts))


def run_load(client, model: str, requests: list[BenchRequest], concurrency: int, *, desc: str = "",
             progress: bool = True):
    """Send `requests` with at most `concurrency` in flight (each worker sends its next request as
    soon as its last one is answered, as sglang.bench_serving's --max-concurrency does).
    Returns (records in request order, wall seconds from the first send to the last answer)."""
    from tqdm import tqdm

    bar = tqdm(total=len(requests), desc=desc, disable=not progress, leave=False)
    lock = threading.Lock()

    def one(req):
        rec = stream_chat(client, model, req)
        with lock:
            bar.update(1)
        return rec

    start = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        records = list(pool.map(one, requests))
    duration = time.perf_counter() - start
    bar.close()
    return records, duration
