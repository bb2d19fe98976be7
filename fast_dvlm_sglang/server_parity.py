"""Spec == AR through running servers, tie-aware (`decoding/parity.py` holds the rule).

An AR server asked for top logprobs (SGLang's native `/generate`, `return_logprob` +
`top_logprobs_num`) gives, at every output position, AR's top-k logprobs of a 1-token decode
step: the gap to the runner-up is the logit gap. The other algorithm's greedy answer to the same
prompt must equal AR's, or part from it at a position where AR's gap is within the noise bound.

The bound is measured on the same AR server: the same contexts' next-token distributions from the
decode steps vs from one causal extend over prompt + answer (`input_top_logprobs`, the prompt's
KV possibly cached), i.e. a 1-token forward vs a multi-token causal forward in the server's own
dtype, kernels and backend (the verify pass of spec is such a causal extend over the cache).

Used by `tests/sglang/test_numerics.py` (CPU, float32/bfloat16) and `benchmarks/gpu_smoke.py`.
Needs `httpx` (the `dev` extra).
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Sequence
from dataclasses import dataclass, field

from .decoding.parity import (
    DEFAULT_TOP_K,
    SAFETY_FACTOR,
    NoiseMeasurement,
    ParityVerdict,
    noise_from_positions,
    topk_gap_noise,
    verdict_from_top_logprobs,
)

__all__ = ["Answer", "ServerPrompt", "answer", "answers", "ar_answers", "compare", "generate",
           "measure_server_noise", "tally", "top_entries"]


@dataclass(frozen=True)
class ServerPrompt:
    """One request: the rendered chat text (the server tokenizes it), an optional image data URL."""

    text: str
    image: str | None = None
    max_new_tokens: int = 64


@dataclass(frozen=True)
class Answer:
    output_ids: list[int]
    meta: dict = field(repr=False)
    top_logprobs: list | None = field(default=None, repr=False)  # AR with top_k: per output position

    @property
    def nfe(self) -> list[int] | None:
        """`meta_info["dllm_nfe"]` (spec servers): the request's forwards so far, per output token."""
        return self.meta.get("dllm_nfe")

    @property
    def tokens_per_nfe(self) -> float | None:
        nfe = self.nfe
        return len(self.output_ids) / nfe[-1] if nfe and nfe[-1] else None


def _base_url(server) -> str:
    return server if isinstance(server, str) else server.base_url


def _headers(server) -> dict:
    return {} if isinstance(server, str) else server.headers


def generate(server, body: dict, timeout: float = 900) -> dict:
    import httpx

    r = httpx.post(_base_url(server) + "/generate", json=body, headers=_headers(server), timeout=timeout)
    r.raise_for_status()
    return r.json()


def answer(server, prompt: ServerPrompt, *, top_k: int = 0, logprob_start_len: int | None = None,
           timeout: float = 900) -> Answer:
    """One greedy native request; with `top_k`, AR's top-k logprobs at every output position
    (and, with `logprob_start_len=0`, the prompt's token ids in `meta["input_token_logprobs"]`)."""
    body = {"text": prompt.text, "sampling_params": {"max_new_tokens": prompt.max_new_tokens, "temperature": 0}}
    if prompt.image is not None:
        body["image_data"] = prompt.image
    if top_k:
        body.update(return_logprob=True, top_logprobs_num=top_k)
        if logprob_start_len is not None:
            body["logprob_start_len"] = logprob_start_len
    out = generate(server, body, timeout)
    meta = out["meta_info"]
    return Answer(list(out["output_ids"]), meta, meta.get("output_top_logprobs") if top_k else None)


def answers(server, prompts: Sequence[ServerPrompt], *, concurrency: int = 16, top_k: int = 0) -> list[Answer]:
    """All prompts, `concurrency` in flight (the server batches them)."""
    with cf.ThreadPoolExecutor(max(1, min(concurrency, len(prompts)))) as pool:
        return list(pool.map(lambda p: answer(server, p, top_k=top_k), prompts))


def ar_answers(server, prompts: Sequence[ServerPrompt], *, top_k: int = DEFAULT_TOP_K,
               concurrency: int = 16) -> list[Answer]:
    return answers(server, prompts, concurrency=concurrency, top_k=top_k)


def _extend_top_logprobs(server, prompt: ServerPrompt, prompt_ids: list[int], tokens: list[int], top_k: int):
    """The server's top-k logprobs predicting tokens[0..n-1] from one causal extend over
    prompt + tokens[:-1] (entry j predicts tokens[j]); also the prompt's length as served."""
    body = {"input_ids": prompt_ids + tokens[:-1], "return_logprob": True, "top_logprobs_num": top_k,
            "sampling_params": {"max_new_tokens": 1, "temperature": 0}}
    if prompt.image is not None:
        body["image_data"] = prompt.image  # the server expands the image pad in the ids as in text
    # logprobs from the prompt's last position on; the cache may hold the prompt up to there
    probe = generate(server, {**body, "return_logprob": False, "sampling_params": {"max_new_tokens": 1}})
    served_prompt = probe["meta_info"]["prompt_tokens"] - (len(tokens) - 1)
    body["logprob_start_len"] = served_prompt - 1
    meta = generate(server, body)["meta_info"]
    # entry 0 predicts the prompt's last token; entry j + 1 predicts tokens[j]; the generated
    # token's distribution (the extend's last position) predicts tokens[-1]
    return meta["input_top_logprobs"][1:] + [meta["output_top_logprobs"][0]], served_prompt


def measure_server_noise(server, prompts: Sequence[ServerPrompt], tokenize, *, steps=None, top_k: int = DEFAULT_TOP_K,
                         safety_factor: float = SAFETY_FACTOR, source: str = "") -> NoiseMeasurement:
    """Gap noise between AR's 1-token steps and one causal extend of `server` over the same tokens
    (over the cached prompt), for each calibration prompt's greedy answer.

    The steps are the server's own AR decode steps (`server` must then serve `ar`), or, with
    `steps(prompt) -> (token ids, top-k entries per position)`, another AR implementation's (the
    reference model's, to bound the noise between it and the server). `tokenize(text) -> ids` must
    be the server's tokenizer without special tokens added (image pads unexpanded: the server
    expands them). Position 0, predicted by a prefill in both, is left out."""
    per_prompt = []
    for prompt in prompts:
        served = None
        if steps is None:
            ar = answer(server, prompt, top_k=top_k)
            ids, entries, served = ar.output_ids, ar.top_logprobs, ar.meta["prompt_tokens"]
        else:
            ids, entries = steps(prompt)
        if len(ids) < 2:
            continue
        ext, served_prompt = _extend_top_logprobs(server, prompt, list(tokenize(prompt.text)), list(ids), top_k)
        if (served is not None and served_prompt != served) or len(ext) != len(ids):
            raise RuntimeError(f"the extend request does not reproduce the prompt: {served_prompt} prompt tokens "
                               f"(text request: {served}), {len(ext)} positions for {len(ids)} tokens; "
                               "is `tokenize` the server's tokenizer?")
        per_prompt.append([topk_gap_noise(a, b) for a, b in zip(entries[1:], ext[1:])])
    return noise_from_positions(per_prompt, source=source or "server: decode steps vs causal extend",
                                safety_factor=safety_factor)


def top_entries(logits, k: int = DEFAULT_TOP_K) -> list:
    """Logits rows [L, V] as top-k logprob entries per position, in the server's format."""
    import torch

    lp = torch.log_softmax(logits.double(), dim=-1)
    top = lp.topk(k, dim=-1)
    return [[[float(v), int(i), None] for v, i in zip(vals, idx)] for vals, idx in zip(top.values, top.indices)]


def compare(ar: Sequence[Answer], other: Sequence[Answer], bound: float) -> list[ParityVerdict]:
    """Tie-aware verdict of each of `other`'s answers against AR's (AR answers need top logprobs)."""
    return [verdict_from_top_logprobs(a.output_ids, o.output_ids, a.top_logprobs, bound) for a, o in zip(ar, other)]


def tally(verdicts: Sequence[ParityVerdict]) -> dict:
    """Counts: equal, parted at a near tie, real divergences (and the ties' gaps)."""
    return {"n": len(verdicts), "equal": sum(v.equal for v in verdicts), "ties": sum(v.tie for v in verdicts),
            "failures": sum(not v.ok for v in verdicts),
            "tie_gaps": [v.gap for v in verdicts if v.tie], "tie_positions": [v.index for v in verdicts if v.tie]}
