"""Spec == AR, precisely: where two greedy outputs part, AR's logit gap there, and whether that gap
lies within the measured logit noise between the two forward shapes.

Greedy speculative decoding equals greedy AR in exact arithmetic: the verify pass computes, at
every block position, the same causal next-token logits an AR step computes. In floating point a
block-shaped causal forward (the verify pass: `block_size` tokens over the cache) and a 1-token
step run different reductions (matmul row blocking, attention kernels), so their logits differ in
the last bits, and the two argmaxes can part where AR's top two logits nearly tie. What "equal"
means in this project, and what this module decides:

    equal, or the first divergence i has gap_i <= bound, where
    gap_i = l_AR[i][ar_i] - l_AR[i][other_i]   (AR's step logits; ar_i is their argmax)
    bound = SAFETY_FACTOR * (measured gap noise between a 1-token step and a block forward)

`gap_i` is at least AR's top-2 gap, and equals it when the other output took AR's runner-up.
After the first divergence the two continuations legitimately differ; the reference check
(`reference_verdict(..., check_rest=True)`) additionally requires every later token of the other
output to be AR's greedy choice given that output's own prefix (within the same bound).

Gap noise. For one context, take the next-token logits of a 1-token step (`a`) and of the same
position inside a block forward (`b`); with d = a - b (a constant shift such as log-softmax's
normaliser cancels), a token t's gap to the top token moves by |d[top] - d[t]|. The gap noise
of the position is the largest such move over the step's top-k tokens (the only ones that can
become the argmax); the measured noise is its maximum over every position of a few prompts.
A flip at i needs gap_i <= the noise at i, so the rule is exact up to how well the measurement
covers the positions tested: see `SAFETY_FACTOR`.

Two sources of AR logits: the reference model (`step_logits`, the forwards `ar.py` runs, so the
honest AR source, not a full causal forward over prompt+answer, which is itself another shape),
and a server's AR responses with top logprobs (`verdict_from_top_logprobs`: logprob gaps are
logit gaps). The same noise measure applies to server numbers (`topk_gap_noise`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from ..attention_masks import causal_mask
from .session import DecodeSession, Prompt

__all__ = [
    "DEFAULT_TOP_K",
    "SAFETY_FACTOR",
    "NoiseMeasurement",
    "ParityVerdict",
    "block_logits",
    "causal_logits",
    "first_divergence",
    "gap_noise",
    "greedy_ar_with_logits",
    "measure_reference_noise",
    "noise_from_positions",
    "reference_verdict",
    "step_logits",
    "top2_gaps",
    "topk_gap_noise",
    "verdict_from_logits",
    "verdict_from_top_logprobs",
]

DEFAULT_TOP_K = 5
# The bound is SAFETY_FACTOR x the largest gap noise measured over a few calibration prompts. Why 4
# (the measurements are in the README's "Numerics"):
# (1) 2x for the positions the calibration did not see: on every model and dtype we measured
#     (reference float32/bfloat16 on CPU, SGLang float32/bfloat16 on CPU), the largest noise over
#     8 fresh prompts was at most 1.5x (float32) and 2.0x (bfloat16, where the noise comes in bf16
#     ulps of the logits) the calibration's maximum over 4-8 prompts;
# (2) 2x for the shape difference between what is calibrated and what the tested pass runs: a
#     verify block starts wherever a round starts, and on a server the calibration's causal extend
#     stands in for the verify pass's kernel; the other shapes we measured against 1-token steps
#     (32-token blocks at other offsets, 8-token blocks, one full causal forward) came within
#     1.02x of the calibrated noise, so 2x leaves room for a kernel we cannot calibrate directly;
# (3) it stays far below the gaps of a real bug: AR's median top-2 gap is ~2e3 (random tiny models)
#     to ~3e5 (demo) x the bound in float32, ~20x in bfloat16 on the demo model, so a wrong token at
#     a typical position is never taken for a tie. `tests/test_parity.py` checks (1) and (2) on
#     fresh prompts for the reference model; a planted tie is accepted, a corrupted output rejected.
SAFETY_FACTOR = 4.0


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first position where the two token lists differ (or where the shorter one
    ends, if one is a prefix of the other); None if they are equal."""
    a, b = list(a), list(b)
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


# ---- reference-model logits for a given continuation (teacher forcing) -------------------------
@torch.inference_mode()
def step_logits(model, prompt: Prompt, tokens: Sequence[int]) -> torch.Tensor:
    """AR's next-token logits [len(tokens), V] (float32) for `tokens` after `prompt`: row i is what
    an AR step sees before emitting tokens[i]. The same forwards as `ar.ar_decode`: the prompt
    prefill (row 0), then one 1-token causal forward per token."""
    session = DecodeSession(model, prompt)
    rows = [session.prefill().float()]
    for t in list(tokens)[:-1]:
        rows.append(session.forward([int(t)], bidirectional=False, write=True)[-1].float())
    return torch.stack(rows)


@torch.inference_mode()
def block_logits(model, prompt: Prompt, tokens: Sequence[int], block_size: int | None = None,
                 offset: int = 0) -> torch.Tensor:
    """The same next-token logits [len(tokens), V] computed verify-shaped: after the prefill, causal
    forwards of `block_size` tokens over the cache (the first block holds `offset + 1` tokens, so
    offsets move the block boundaries as rounds do). Row 0 is the prefill's, as for a spec seed."""
    tokens = [int(t) for t in tokens]
    block_size = block_size or model.config.block_size
    session = DecodeSession(model, prompt)
    rows = [session.prefill().float()]
    feed = tokens[:-1]
    start, first = 0, (offset % block_size) + 1
    while start < len(feed):
        size = first if start == 0 else block_size
        chunk = feed[start : start + size]
        rows.extend(session.forward(chunk, bidirectional=False, write=True).float())
        start += len(chunk)
    return torch.stack(rows)


@torch.inference_mode()
def causal_logits(model, prompt: Prompt, tokens: Sequence[int]) -> torch.Tensor:
    """The same logits from one causal forward over prompt + tokens[:-1] (a third shape; a
    shortcut for AR's logits only within the noise, which `tests/test_parity.py` measures)."""
    tokens = [int(t) for t in tokens]
    device = model.device
    prompt_embeds, positions = prompt.embed_and_positions(model)
    n = prompt_embeds.shape[1]
    # generated tokens are text: positions continue on all three axes (as DecodeSession places them)
    after = torch.arange(len(tokens) - 1, device=device) + int(positions.max()) + 1
    positions = torch.cat([positions, after.view(1, 1, -1).expand(3, 1, -1)], dim=-1)
    new = torch.tensor([tokens[:-1]], dtype=torch.long, device=device)
    embeds = torch.cat([prompt_embeds, model.model.language_model.embed_tokens(new)], dim=1)
    logits = model(embeds, positions, causal_mask(embeds.shape[1], device=device))[0]
    return logits[n - 1 :].float()


@torch.inference_mode()
def greedy_ar_with_logits(model, prompt: Prompt, max_new_tokens: int,
                          eos_token_ids: Sequence[int] | None = None) -> tuple[list[int], torch.Tensor]:
    """Greedy AR tokens and their step logits [len, V] in one pass (the forwards of `ar_decode`;
    stops after an EOS or at `max_new_tokens`)."""
    eos = set(model.config.eos_token_ids if eos_token_ids is None else eos_token_ids)
    session = DecodeSession(model, prompt)
    logits = session.prefill().float()
    tokens, rows = [], []
    while True:
        rows.append(logits)
        tokens.append(int(logits.argmax()))
        if tokens[-1] in eos or len(tokens) >= max_new_tokens:
            return tokens, torch.stack(rows)
        logits = session.forward(tokens[-1:], bidirectional=False, write=True)[-1].float()


# ---- gaps and noise ------------------------------------------------------------------------------
def top2_gaps(logits: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 logit [L] of logits [L, V]."""
    top = logits.float().topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def gap_noise(a: torch.Tensor, b: torch.Tensor, top_k: int = DEFAULT_TOP_K) -> torch.Tensor:
    """Per-position gap noise [L] between logits a and b [L, V] of the same contexts: the largest
    |(a[top] - a[t]) - (b[top] - b[t])| over a's top-k tokens t (top = a's argmax)."""
    a, b = a.double(), b.double()
    idx = a.topk(min(top_k, a.shape[-1]), dim=-1).indices  # [L, k], column 0 = argmax
    d = a.gather(-1, idx) - b.gather(-1, idx)
    return (d[:, :1] - d).abs().amax(dim=-1)


def _pairs(entries) -> list[tuple[float, int]]:
    """[(logprob, token id)] from SGLang's top-logprob entries ([logprob, id, text] or dicts)."""
    out = []
    for e in entries or ():
        if isinstance(e, dict):
            out.append((float(e["logprob"]), int(e["token_id"])))
        else:
            out.append((float(e[0]), int(e[1])))
    return out


def topk_gap_noise(a_entries, b_entries) -> float | None:
    """Gap noise of one position from two top-k logprob lists (e.g. an AR decode step's
    `output_top_logprobs[i]` and a causal extend's `input_top_logprobs` for the same context).
    Only tokens present in both lists count; None if a's top token is missing from b's list."""
    a, b = dict((t, lp) for lp, t in _pairs(a_entries)), dict((t, lp) for lp, t in _pairs(b_entries))
    if not a:
        return None
    top = max(a, key=lambda t: (a[t], -t))
    if top not in b:
        return None
    common = [t for t in a if t in b]
    d_top = a[top] - b[top]
    return max(abs(d_top - (a[t] - b[t])) for t in common)


@dataclass(frozen=True)
class NoiseMeasurement:
    """Gap noise between two forward shapes over a set of calibration positions."""

    max_gap_noise: float  # max over positions (what the bound is built from)
    per_prompt: tuple[float, ...]  # each prompt's max
    positions: int  # positions measured
    max_abs_logit_diff: float | None = None  # reference only: max |a - b| over the whole vocabulary
    unmatched: int = 0  # server only: positions where a's top token was missing from b's top-k
    safety_factor: float = SAFETY_FACTOR
    source: str = ""

    @property
    def bound(self) -> float:
        return self.safety_factor * self.max_gap_noise

    def summary(self) -> dict:
        return {"source": self.source, "max_gap_noise": self.max_gap_noise, "bound": self.bound,
                "safety_factor": self.safety_factor, "positions": self.positions,
                "per_prompt_max": list(self.per_prompt), "max_abs_logit_diff": self.max_abs_logit_diff,
                "unmatched": self.unmatched}


def noise_from_positions(per_prompt: Sequence[Sequence[float | None]], *, source: str = "",
                         max_abs_logit_diff: float | None = None,
                         safety_factor: float = SAFETY_FACTOR) -> NoiseMeasurement:
    """A measurement from per-prompt lists of per-position gap noise (None: unmatched position)."""
    maxima, positions, unmatched = [], 0, 0
    for values in per_prompt:
        known = [float(v) for v in values if v is not None]
        unmatched += sum(v is None for v in values)
        positions += len(known)
        maxima.append(max(known, default=0.0))
    return NoiseMeasurement(max(maxima, default=0.0), tuple(maxima), positions, max_abs_logit_diff,
                            unmatched, safety_factor, source)


def measure_reference_noise(model, prompts: Sequence[Prompt], *, n_tokens: int = 64,
                            block_size: int | None = None, top_k: int = DEFAULT_TOP_K,
                            safety_factor: float = SAFETY_FACTOR) -> NoiseMeasurement:
    """Gap noise between AR's 1-token steps and verify-shaped block forwards of the reference
    model, over each prompt's greedy AR continuation (EOS ignored, `n_tokens` long), with the
    block boundaries at a different offset for each prompt."""
    block_size = block_size or model.config.block_size
    per_prompt, max_abs = [], 0.0
    for i, prompt in enumerate(prompts):
        tokens, steps = greedy_ar_with_logits(model, prompt, n_tokens, eos_token_ids=())
        blocks = block_logits(model, prompt, tokens, block_size, offset=(7 * i) % block_size)
        per_prompt.append(gap_noise(steps[1:], blocks[1:], top_k).tolist())  # row 0: the same prefill
        max_abs = max(max_abs, float((steps - blocks).abs().max()))
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    return noise_from_positions(per_prompt, source=f"reference {dtype}: 1-token steps vs {block_size}-token "
                                f"causal blocks", max_abs_logit_diff=max_abs, safety_factor=safety_factor)


# ---- the verdict ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParityVerdict:
    """Whether `other` (e.g. spec) equals AR's greedy output, or parts from it only at a near-tie."""

    index: int | None  # first divergence; None: equal
    ar_token: int | None = None
    other_token: int | None = None
    gap: float | None = None  # AR's logit(ar_token) - logit(other_token) at `index` (None: unknown)
    bound: float = 0.0
    reason: str = "equal"
    # `reference_verdict(check_rest=True)`: a later token of `other` that is not AR's greedy choice
    # on `other`'s own prefix, and its gap (position, gap); None: none found or not checked
    later: tuple[int, float] | None = None

    @property
    def equal(self) -> bool:
        return self.index is None

    @property
    def tie(self) -> bool:
        """Parted at a near tie (and, if checked, followed AR's greedy choices after it)."""
        return not self.equal and self.gap is not None and self.gap <= self.bound and self.later is None

    @property
    def ok(self) -> bool:
        return self.equal or self.tie

    def __str__(self) -> str:
        if self.equal:
            return "equal"
        gap = "unknown" if self.gap is None else f"{self.gap:.3g}"
        status = "near tie" if self.tie else "REAL DIVERGENCE"
        later = "" if self.later is None else (f"; but token {self.later[0]} after it is not AR's greedy "
                                                f"choice on the other output's prefix (gap {self.later[1]:.3g})")
        return (f"{status}: first divergence at token {self.index} (AR {self.ar_token}, other "
                f"{self.other_token}), AR gap {gap} vs noise bound {self.bound:.3g}; {self.reason}{later}")


def _prefix_verdict(ar: list[int], other: list[int], i: int, bound: float) -> ParityVerdict:
    return ParityVerdict(i, ar[i] if i < len(ar) else None, other[i] if i < len(other) else None, None, bound,
                         "one output is a prefix of the other (a stop differs), not a near tie")


def _diverge(ar_tokens: Sequence[int], other_tokens: Sequence[int], bound: float):
    """(ar, other, i, verdict): the verdict is set when no logits are needed (equal outputs, or
    one a prefix of the other); else i is the first position where both have a differing token."""
    ar, other = [int(t) for t in ar_tokens], [int(t) for t in other_tokens]
    i = first_divergence(ar, other)
    if i is None:
        return ar, other, i, ParityVerdict(None, bound=bound)
    if i >= min(len(ar), len(other)):
        return ar, other, i, _prefix_verdict(ar, other, i, bound)
    return ar, other, i, None


def verdict_from_logits(ar_tokens: Sequence[int], other_tokens: Sequence[int], ar_logits: torch.Tensor,
                        bound: float) -> ParityVerdict:
    """Verdict from AR's step logits (`step_logits(model, prompt, ar_tokens)`, at least up to the
    divergence)."""
    ar, other, i, verdict = _diverge(ar_tokens, other_tokens, bound)
    if verdict is not None:
        return verdict
    row = ar_logits[i].double()
    if row[ar[i]] < row.max():
        raise ValueError(f"AR token {ar[i]} at {i} is not the argmax of the given logits: not AR's step logits")
    gap = float(row[ar[i]] - row[other[i]])
    top2 = float(top2_gaps(row[None])[0])
    return ParityVerdict(i, ar[i], other[i], gap, bound, f"AR top-2 gap {top2:.3g} (step logits)")


def verdict_from_top_logprobs(ar_tokens: Sequence[int], other_tokens: Sequence[int], ar_top_logprobs,
                              bound: float) -> ParityVerdict:
    """Verdict from a server's AR response with top logprobs: `ar_top_logprobs[i]` lists AR's top-k
    (logprob, token id) at output position i (SGLang's `meta_info["output_top_logprobs"]`). A
    logprob gap is the logit gap. If the other token is not in AR's top-k the gap is only known to
    exceed AR's top-1 minus top-k: then the divergence is not accepted as a tie."""
    ar, other, i, verdict = _diverge(ar_tokens, other_tokens, bound)
    if verdict is not None:
        return verdict
    entries = dict((t, lp) for lp, t in _pairs(ar_top_logprobs[i]))
    if ar[i] not in entries or entries[ar[i]] < max(entries.values()):
        raise ValueError(f"AR token {ar[i]} at {i} is not the top of the given top logprobs")
    top2 = sorted(entries.values(), reverse=True)[:2]
    note = f"AR top-2 gap {top2[0] - top2[-1]:.3g} (server top-{len(entries)} logprobs)"
    if other[i] not in entries:
        lower = entries[ar[i]] - min(entries.values())
        return ParityVerdict(i, ar[i], other[i], None, bound,
                             f"the other token is not in AR's top-{len(entries)}: gap > {lower:.3g}; {note}")
    return ParityVerdict(i, ar[i], other[i], entries[ar[i]] - entries[other[i]], bound, note)


def reference_verdict(model, prompt: Prompt, ar_tokens: Sequence[int], other_tokens: Sequence[int],
                      bound: float, *, check_rest: bool = False) -> ParityVerdict:
    """Verdict with the reference model's AR step logits (computed only if the outputs differ).

    With `check_rest`, a tie at i is accepted only if every later token of `other` is, within the
    bound, AR's greedy choice given `other`'s own prefix (so nothing after the tie is wrong)."""
    ar, other, i, verdict = _diverge(ar_tokens, other_tokens, bound)
    if verdict is not None:
        return verdict
    verdict = verdict_from_logits(ar, other, step_logits(model, prompt, ar[: i + 1]), bound)
    if not (verdict.tie and check_rest) or i + 1 >= len(other):
        return verdict
    rest = step_logits(model, prompt, other).double()[i + 1 :]
    picked = rest.gather(-1, torch.tensor(other[i + 1 :])[:, None])[:, 0]
    worst = rest.max(dim=-1).values - picked
    j = int(worst.argmax())
    if float(worst[j]) <= bound:
        return verdict
    return replace(verdict, later=(i + 1 + j, float(worst[j])))
