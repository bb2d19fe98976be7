"""Helpers for the SGLang server tests: image data URLs, native /generate, /metrics gauges, the
KV slots requests hold.

The managed `fast-dvlm serve` process is `fast_dvlm_sglang.server_process.ServeProcess`."""

from __future__ import annotations

import base64
import io
import time


def image_url(color: str = "red", shape: str = "ellipse", size: int = 56) -> str:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), "white")
    getattr(ImageDraw.Draw(im), shape)([8, 8, size - 8, size - 8], fill=color)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def demo_prompts(seed: int, n: int = 8) -> list[tuple[str, str | None]]:
    """Held-out demo prompts for the native /generate: (the chat-template text, the image as a
    PNG data URL, or None for a text-only prompt)."""
    from fast_dvlm_sglang.demo import DEMO_CHECKPOINT, shapes
    from fast_dvlm_sglang.processing import render_chat
    from fast_dvlm_sglang.tokenizer import load_processor

    proc = load_processor(DEMO_CHECKPOINT)
    out = []
    for s in shapes.make_split(seed, n):
        url = None
        if s.image is not None:
            buf = io.BytesIO()
            s.image.save(buf, format="PNG")
            url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        out.append((render_chat(proc, s.prompt_messages, add_generation_prompt=True), url))
    return out


def generate(server, text: str, *, image: str | list[str] | None = None, timeout: float = 300,
             request: dict | None = None, **sampling) -> dict:
    """SGLang's native /generate (returns output ids and meta_info); greedy unless told. `request`:
    top-level fields of the request (return_logprob, return_hidden_states, ...)."""
    import httpx

    sampling.setdefault("temperature", 0)
    body = {"text": text, "sampling_params": sampling, **(request or {})}
    if image is not None:
        body["image_data"] = image
    r = httpx.post(server.base_url + "/generate", json=body, headers=server.headers, timeout=timeout)
    r.raise_for_status()
    return r.json()


def prometheus_value(server, name: str) -> float:
    """One gauge of SGLang's /metrics (server started with --enable-metrics), e.g.
    `sglang:kv_available_tokens` (free KV slots of the token pool)."""
    import httpx

    for line in httpx.get(server.base_url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def kv_tokens_in_use(server) -> int:
    """KV slots held by requests: the pool minus its free slots and those only the radix tree
    holds (evictable), `num_used_tokens` of SGLang's /v1/loads summed over its ranks; 0 when every
    request's KV came back. The scheduler publishes that snapshot before releasing each batch's
    finished requests and at once when it goes idle, so it reaches 0 only once the pool is whole
    (the /metrics gauges of the same numbers refresh only every 30 s while idle)."""
    import httpx

    loads = httpx.get(server.base_url + "/v1/loads", headers=server.headers, timeout=30).json()["loads"]
    assert loads, "no scheduler rank answered /v1/loads"
    return sum(int(load["num_used_tokens"]) for load in loads)


def wait_for(predicate, timeout: float = 60.0) -> bool:
    """Poll `predicate` every 0.5 s until it holds or `timeout` passes (SGLang's gauges refresh at
    batch reports and when the scheduler goes idle, not at once)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return predicate()


def reference_log_probs(checkpoint, input_ids: list[int], pixel_values=None, image_grid_thw=None):
    """The reference model's (`fast_dvlm_sglang.model`, float64 log-softmax of its float32 logits)
    causal log-probabilities at every prompt position, [len(input_ids), vocab]: row p scores the
    token after position p. The oracle for the prompt logprobs a server returns."""
    import torch

    from fast_dvlm_sglang.attention_masks import causal_mask
    from fast_dvlm_sglang.model import FastDVLMForConditionalGeneration

    model = FastDVLMForConditionalGeneration.from_pretrained(checkpoint).eval()
    ids = torch.tensor([input_ids])
    with torch.no_grad():
        emb = model.embed(ids, pixel_values, image_grid_thw)
        logits = model(emb, model.rope_positions(ids, image_grid_thw), causal_mask(ids.shape[1]))
    return torch.log_softmax(logits[0].double(), dim=-1)


def reference_hidden_states(checkpoint, input_ids: list[int]):
    """The reference model's final hidden states (after the last norm, what the LM head reads) at
    every position of a text prompt, causally, [len(input_ids), hidden]: the oracle for the hidden
    states a server returns (`return_hidden_states`)."""
    import torch

    from fast_dvlm_sglang.attention_masks import causal_mask
    from fast_dvlm_sglang.model import FastDVLMForConditionalGeneration

    model = FastDVLMForConditionalGeneration.from_pretrained(checkpoint).eval()
    ids = torch.tensor([input_ids])
    with torch.no_grad():
        emb = model.embed(ids, None, None)
        hidden = model.model.language_model(emb, model.rope_positions(ids, None), causal_mask(ids.shape[1]))
    return hidden[0]


def assert_prompt_logprobs(meta: dict, input_ids: list[int], logp, start: int, top: int = 0, atol: float = 2e-4,
                           skip_ids=()) -> None:
    """SGLang's prompt-logprob lists in `meta` (/generate's meta_info with `logprob_start_len` =
    `start`) against the reference `logp` (`reference_log_probs`): one entry per prompt token from
    `start` on, its token id, and the first without a value (SGLang scores token p from row p - 1
    only for the tokens after the first it returns); `top` > 0: the top-`top` values too. Tokens
    in `skip_ids` (image placeholders, which SGLang replaces by a hash) are not compared."""
    import torch

    served = meta["input_token_logprobs"]
    assert [t[1] for t in served if t[1] not in skip_ids] == [t for t in input_ids[start:] if t not in skip_ids]
    assert served[0][0] is None and len(served) == len(input_ids) - start
    keep = [i for i in range(start + 1, len(input_ids)) if input_ids[i] not in skip_ids]
    got = torch.tensor([served[i - start][0] for i in keep], dtype=torch.float64)
    want = torch.tensor([float(logp[i - 1, input_ids[i]]) for i in keep], dtype=torch.float64)
    torch.testing.assert_close(got, want, atol=atol, rtol=0)
    if top:
        rows = meta["input_top_logprobs"]
        assert len(rows) == len(served) and rows[0] is None
        got = torch.tensor([[v for v, _, _ in rows[i - start]] for i in range(start + 1, len(input_ids))],
                           dtype=torch.float64).reshape(-1, top)
        want = logp[start:len(input_ids) - 1].topk(top, dim=-1).values
        torch.testing.assert_close(got, want, atol=atol, rtol=0)
