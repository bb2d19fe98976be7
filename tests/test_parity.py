"""`decoding/parity.py`: the tie-aware spec == AR rule, and that its diagnosis works both ways: a
divergence at a planted near tie is accepted, a corrupted output at a real gap is rejected."""

from __future__ import annotations

import pytest
import torch
from helpers import BASE_VOCAB, image_prompt, write_tiny

from fast_dvlm_sglang.decoding import GenerationConfig, Prompt, generate
from fast_dvlm_sglang.decoding.parity import (
    SAFETY_FACTOR,
    block_logits,
    causal_logits,
    first_divergence,
    gap_noise,
    greedy_ar_with_logits,
    measure_reference_noise,
    reference_verdict,
    step_logits,
    top2_gaps,
    topk_gap_noise,
    verdict_from_logits,
    verdict_from_top_logprobs,
)
from fast_dvlm_sglang.model import FastDVLMForConditionalGeneration


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return FastDVLMForConditionalGeneration.from_pretrained(write_tiny(tmp_path_factory.mktemp("p") / "ckpt", seed=0))


def prompts(n: int, seed: int) -> list[Prompt]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        if i % 3 == 2:
            out.append(Prompt(*image_prompt(grid=(1, 8, 8), seed=seed * 100 + i)))
        else:
            length = int(torch.randint(1, 40, (1,), generator=gen))
            out.append(Prompt(torch.randint(0, BASE_VOCAB, (length,), generator=gen).tolist()))
    return out


@pytest.fixture(scope="module")
def noise(model):
    return measure_reference_noise(model, prompts(4, seed=99), n_tokens=64)


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2
    assert first_divergence([], []) is None


def test_step_logits_are_the_ar_decoder_forwards(model):
    for prompt in prompts(3, seed=1):
        ar = generate(model, prompt, GenerationConfig("ar", max_new_tokens=40, eos_token_ids=()))
        tokens, logits = greedy_ar_with_logits(model, prompt, 40, eos_token_ids=())
        assert tokens == ar.token_ids
        assert torch.equal(step_logits(model, prompt, tokens), logits)  # the same forwards, bit for bit
        assert logits.argmax(-1).tolist() == tokens


def test_shape_noise_is_small_and_the_bound_covers_fresh_prompts(model, noise):
    """The measured noise is the float32 rounding of a different reduction order: tiny next to
    the logits and to AR's typical top-2 gap; prompts not used for calibration (and the other
    shapes: other block sizes, one full causal forward) stay within the bound."""
    assert noise.positions == 4 * 63 and 0 <= noise.max_gap_noise < 1e-3
    assert noise.bound == SAFETY_FACTOR * noise.max_gap_noise
    fresh = measure_reference_noise(model, prompts(4, seed=123), n_tokens=64, block_size=8)
    assert fresh.max_gap_noise <= noise.bound, (fresh.summary(), noise.summary())
    gaps = []
    for prompt in prompts(2, seed=5):
        tokens, steps = greedy_ar_with_logits(model, prompt, 64, eos_token_ids=())
        assert float(gap_noise(steps, causal_logits(model, prompt, tokens)).max()) <= noise.bound
        assert float(gap_noise(steps, block_logits(model, prompt, tokens, 32, offset=5)).max()) <= noise.bound
        gaps.append(top2_gaps(steps))
    assert float(torch.cat(gaps).median()) > 100 * noise.bound  # a real bug is far outside the bound


class PlantedTie:
    """The model, except that token `planted` is the runner-up by `delta` in every 1-token forward
    (AR steps) and the top by `delta` in every multi-token forward (prefill, draft, verify): two
    forward shapes that disagree at a near tie, as rounding does, only planted and deterministic."""

    def __init__(self, model, planted: int, delta: float):
        self.inner, self.planted, self.delta = model, planted, delta

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, embeds, positions, mask, cache=None, write_cache=False):
        logits = self.inner(embeds, positions, mask, cache, write_cache).clone()
        others = logits.clone()
        others[..., self.planted] = float("-inf")
        sign = -1.0 if logits.shape[1] == 1 else 1.0
        logits[..., self.planted] = others.max(dim=-1).values + sign * self.delta
        return logits


def test_divergence_at_a_planted_near_tie_is_diagnosed_as_a_tie(model):
    stub = PlantedTie(model, planted=7, delta=1e-3)
    stub_noise = measure_reference_noise(stub, prompts(2, seed=99), n_tokens=40)
    assert stub_noise.max_gap_noise == pytest.approx(2e-3, rel=0.1)  # the plant moves the gap by 2 delta
    for prompt in prompts(3, seed=2):
        ar = generate(stub, prompt, GenerationConfig("ar", max_new_tokens=30, eos_token_ids=()))
        spec = generate(stub, prompt, GenerationConfig("spec", max_new_tokens=30, block_size=8, eos_token_ids=()))
        assert spec.token_ids != ar.token_ids  # they do part: spec verifies with block forwards
        verdict = reference_verdict(stub, prompt, ar.token_ids, spec.token_ids, stub_noise.bound, check_rest=True)
        assert verdict.index == 1 and verdict.other_token == 7 and verdict.gap == pytest.approx(1e-3, rel=0.05)
        assert verdict.tie and verdict.ok, verdict
        # the same divergence, measured against the real model's noise (no plant), is not a tie
        assert not reference_verdict(stub, prompt, ar.token_ids, spec.token_ids, 1e-4).ok


def test_a_corrupted_output_is_rejected(model, noise):
    """A real bug: spec emits AR's runner-up where AR's gap is large, even the smallest gap of the
    answer that still exceeds the bound, or a wrong token later, after a genuine tie."""
    prompt = prompts(1, seed=3)[0]
    tokens, logits = greedy_ar_with_logits(model, prompt, 64, eos_token_ids=())
    gaps = top2_gaps(logits)
    runner_up = logits.topk(2, dim=-1).indices[:, 1]
    candidates = [i for i in range(len(tokens)) if float(gaps[i]) > noise.bound]
    for i in (max(candidates, key=lambda j: float(gaps[j])), min(candidates, key=lambda j: float(gaps[j]))):
        bad = tokens[:i] + [int(runner_up[i])] + tokens[i + 1 :]
        for verdict in (reference_verdict(model, prompt, tokens, bad, noise.bound),
                        verdict_from_logits(tokens, bad, logits, noise.bound)):
            assert verdict.index == i and not verdict.ok and verdict.gap == pytest.approx(float(gaps[i]))
            assert "REAL DIVERGENCE" in str(verdict)
    # a tie at 1 (planted by a bound that admits it), then a token that is not AR's choice
    loose = float(gaps[1]) * 1.01
    after_tie = generate(model, Prompt(prompt.input_ids + [tokens[0], int(runner_up[1])], prompt.pixel_values,
                                       prompt.image_grid_thw), GenerationConfig("ar", max_new_tokens=20, eos_token_ids=()))
    good_rest = [tokens[0], int(runner_up[1]), *after_tie.token_ids]
    assert reference_verdict(model, prompt, tokens, good_rest, loose, check_rest=True).ok
    j = 6
    worst = int(step_logits(model, prompt, good_rest)[j].argmin())
    bad_rest = good_rest[:j] + [worst] + good_rest[j + 1 :]
    verdict = reference_verdict(model, prompt, tokens, bad_rest, loose, check_rest=True)
    assert not verdict.ok and verdict.later is not None and verdict.later[0] == j, verdict
    # an output that stops early is never a tie
    assert not reference_verdict(model, prompt, tokens, tokens[:10], 1e9).ok


def _top_entries(row: torch.Tensor, k: int = 5) -> list:
    """A logits row as SGLang's top-logprob entries [[logprob, id, text], ...]."""
    lp = torch.log_softmax(row.double(), dim=-1)
    top = lp.topk(k)
    return [[float(v), int(i), None] for v, i in zip(top.values, top.indices)]


def test_server_form_equals_the_logits_form(model):
    """From top logprobs (what an AR server returns) the gap noise and the verdict are the logits'."""
    prompt = prompts(1, seed=4)[0]
    tokens, steps = greedy_ar_with_logits(model, prompt, 48, eos_token_ids=())
    blocks = block_logits(model, prompt, tokens, 32)
    want = gap_noise(steps, blocks)
    got = [topk_gap_noise(_top_entries(a), _top_entries(b)) for a, b in zip(steps, blocks)]
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), want, atol=1e-9, rtol=0)
    entries = [_top_entries(r) for r in steps]
    gaps = top2_gaps(steps)
    second = [e[1][1] for e in entries]
    i = int(gaps.argmin())
    other = tokens[:i] + [second[i]] + [0] * (len(tokens) - i - 1)
    for bound, ok in ((float(gaps[i]) * 1.001, True), (float(gaps[i]) * 0.999, False)):
        a = verdict_from_top_logprobs(tokens, other, entries, bound)
        b = verdict_from_logits(tokens, other, steps, bound)
        assert (a.index, a.ok, b.ok) == (i, ok, ok) and a.gap == pytest.approx(b.gap, abs=1e-6)
    # not in AR's top-5: the gap is unknown, never a tie
    outside = int(steps[i].argsort()[0])
    verdict = verdict_from_top_logprobs(tokens, tokens[:i] + [outside], entries, 1e9)
    assert not verdict.ok and "not in AR's top-5" in verdict.reason
    with pytest.raises(ValueError, match="not the top"):
        verdict_from_top_logprobs([second[0]], [tokens[0]], entries, 1.0)
    assert verdict_from_top_logprobs(tokens, tokens, entries, 0.0).equal
