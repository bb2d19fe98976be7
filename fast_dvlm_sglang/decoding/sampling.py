"""Token choice from logits, shared by every decoder: greedy, or temperature/top-k/top-p/min-p
sampling drawn from a per-request `torch.Generator` (so a fixed seed reproduces a generation).

Before the choice, `adjust_logits` applies what SGLang's AR sampler applies to a position's logits
(`SamplingBatchInfo.apply_logits_bias`, in that order): its penalizers (the additive ones, the
frequency and presence penalties and the `min_new_tokens` ban of every stop token while fewer than
`min_new_tokens` tokens are out, then the multiplicative repetition penalty, over the output
tokens before the position; the prompt is not counted, as in SGLang), then the additive
`logit_bias`. They depend on the position only through the output tokens before it, so a verify
pass applies them to each of its positions as AR would have at that position. (SGLang applies its
penalizers in the iteration order of a set of classes; additive before multiplicative is the order
of its overlap and speculative paths, and the only one a test can pin.)"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    min_p: float = 0.0  # drop tokens less likely than min_p x the likeliest (after temperature)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added logit), OpenAI's logit_bias
    min_new_tokens: int = 0  # stop tokens banned until this many tokens are out
    frequency_penalty: float = 0.0  # minus this x the token's count in the output so far
    presence_penalty: float = 0.0  # minus this once the token is in the output
    repetition_penalty: float = 1.0  # tokens in the output: logit / p if positive, x p if negative

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def penalizes(self) -> bool:
        """Penalties that count the output so far."""
        return bool(self.frequency_penalty) or bool(self.presence_penalty) or self.repetition_penalty != 1.0

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.logit_bias) or self.min_new_tokens > 0 or self.penalizes

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def make_generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        if self.greedy:
            return None
        gen = torch.Generator(device=device)
        gen.manual_seed(self.seed if self.seed is not None else torch.seed())
        return gen


def output_counts(history: Sequence[int], row_tokens: torch.Tensor | None, n: int, vocab: int,
                  device, prior_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """[n, V] counts of each token among the output before each of n consecutive positions: the
    committed output `history`, then `prior_tokens` (output after it still on the device: the
    earlier steps of an AR run), then, for position j, the row's own tokens row_tokens[:j] (a
    verify pass's drafts: position j follows the seed and d_1..d_j)."""
    base = torch.zeros(vocab, dtype=torch.float32, device=device)
    if len(history):
        ids = torch.as_tensor(list(history), dtype=torch.long, device=device)
        base.index_add_(0, ids.clamp(0, vocab - 1), torch.ones_like(ids, dtype=torch.float32))
    if prior_tokens is not None and prior_tokens.numel():
        ids = prior_tokens.reshape(-1).long().clamp(0, vocab - 1)
        base.index_add_(0, ids, torch.ones_like(ids, dtype=torch.float32))
    counts = base.expand(n, vocab).clone()
    if row_tokens is not None and n > 1:
        steps = torch.nn.functional.one_hot(row_tokens[:n - 1].long().clamp(0, vocab - 1), vocab).float()
        counts[1:] += steps.cumsum(0)
    return counts


def adjust_logits(logits: torch.Tensor, params: SamplingParams, produced: int,
                  stop_token_ids: Iterable[int] = (), history: Sequence[int] = (),
                  row_tokens: torch.Tensor | None = None, prior_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [n, V] (or [V]: n = 1) of n consecutive positions, the first choosing output token
    number `produced` (0: the first answer token), with AR's adjustments applied (a new tensor;
    `logits` unchanged). `stop_token_ids`: what ends the answer; `history`: output tokens before
    the first position, on the host, then `prior_tokens` on the device (`produced` in all; only
    penalties read them); `row_tokens`: the tokens at positions 1..n-1 (the penalties count them
    for the positions after them)."""
    if not params.adjusts_logits:
        return logits
    vocab = logits.shape[-1]
    out = logits.reshape(-1, vocab).clone()
    if params.penalizes:
        counts = output_counts(history, row_tokens, out.shape[0], vocab, out.device,
                               prior_tokens).to(out.dtype)
        if params.frequency_penalty:
            out -= params.frequency_penalty * counts
        if params.presence_penalty:
            out -= params.presence_penalty * (counts > 0).to(out.dtype)
    banned_rows = max(0, min(out.shape[0], params.min_new_tokens - produced))
    stops = [t for t in stop_token_ids if 0 <= t < vocab]
    if banned_rows and stops:
        out[:banned_rows, stops] = float("-inf")
    if params.penalizes and params.repetition_penalty != 1.0:
        p = torch.where(counts > 0, params.repetition_penalty, 1.0).to(out.dtype)
        out = torch.where(out < 0, out * p, out / p)
    if params.logit_bias:
        bias = torch.zeros(vocab, dtype=out.dtype, device=out.device)
        for token, value in params.logit_bias:
            if 0 <= token < vocab:
                bias[token] += value
        out += bias
    return out.view(logits.shape)


def sampling_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution tokens are drawn from: softmax(logits / T) restricted to top-k / top-p /
    min-p (min-p relative to the likeliest token, which top-k and top-p always keep)."""
    logits = logits.float()
    if params.greedy:
        return torch.softmax(logits, dim=-1)
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # Drop a token once the mass before it already reaches top_p (the top token always stays).
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= params.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if params.min_p > 0:
        # p < min_p * p_max  <=>  logit < max logit + log(min_p) (same softmax normaliser)
        floor = logits.max(dim=-1, keepdim=True).values + math.log(params.min_p)
        logits = logits.masked_fill(logits < floor, float("-inf"))
    return torch.softmax(logits, dim=-1)


def sample_tokens(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [...] and their probability under the sampling distribution (the "confidence")."""
    probs = sampling_probs(logits, params)
    if params.greedy:
        conf, tokens = probs.max(dim=-1)
        return tokens, conf
    flat = probs.reshape(-1, probs.shape[-1])
    tokens = torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])
    return tokens, probs.gather(-1, tokens[..., None]).squeeze(-1)


def sample_rows(logits: torch.Tensor, params: SamplingParams,
                generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Tokens [R] for the logits [R, V] of R requests that sample with the same `params`, each
    drawn from its own generator: row i is the token `sample_tokens(logits[i:i + 1], params,
    generators[i])` draws (the same row-wise operations, run over all rows at once: at a batch of
    requests the per-row cost of a dozen small tensor operations dominated the step)."""
    probs = sampling_probs(logits, params)
    if params.greedy:
        return probs.max(dim=-1).indices
    return torch.cat([torch.multinomial(probs[i:i + 1], 1, generator=g).view(1) for i, g in enumerate(generators)])
