"""The three reference decoders: spec == AR (greedy), KV cache state, NFE accounting, sampling.

spec == AR means: token for token, or parting only at a near tie of AR's top logits, within the
logit noise measured on the same model between 1-token steps and block forwards (and after the
tie, AR's greedy choice on spec's own prefix): `tie_aware.TieAware`, `decoding/parity.py`.
"""

import dataclasses

import pytest
import torch
from helpers import BASE_VOCAB, image_prompt, write_tiny
from tie_aware import TieAware

from fast_dvlm_sglang.decoding import GenerationConfig, Prompt, SamplingParams, generate, mdm
from fast_dvlm_sglang.decoding.session import DecodeSession
from fast_dvlm_sglang.kv_cache import DenseKVCache
from fast_dvlm_sglang.model import FastDVLMForConditionalGeneration


@pytest.fixture(scope="module", params=[0, 1, 2])
def model(request, tmp_path_factory):
    path = write_tiny(tmp_path_factory.mktemp(f"m{request.param}") / "ckpt", seed=request.param)
    return FastDVLMForConditionalGeneration.from_pretrained(path)


def random_prompts(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    prompts = []
    for i in range(n):
        if i % 3 == 2:
            ids, pv, thw = image_prompt(grid=(1, 4, 4) if i % 2 else (1, 8, 8), seed=seed * 100 + i)
            prompts.append(Prompt(ids, pv, thw))
        else:
            length = int(torch.randint(1, 40, (1,), generator=gen))
            prompts.append(Prompt(torch.randint(0, BASE_VOCAB, (length,), generator=gen).tolist()))
    return prompts


@pytest.fixture(scope="module")
def tie_aware(model):
    return TieAware(model, random_prompts(4, seed=99))


@pytest.mark.parametrize("block_size", [4, 8, 32])
def test_greedy_spec_equals_greedy_ar(model, tie_aware, block_size):
    # EOS disabled so every prompt runs to max_new_tokens and crosses many rounds.
    for i, prompt in enumerate(random_prompts(21, seed=block_size)):
        max_new = 10 + 7 * (i % 6)
        ar = generate(model, prompt, GenerationConfig("ar", max_new_tokens=max_new, eos_token_ids=()))
        spec = generate(model, prompt, GenerationConfig("spec", max_new_tokens=max_new, block_size=block_size, eos_token_ids=()))
        tie_aware.check(prompt, ar.token_ids, spec.token_ids, f"prompt {i}, block {block_size}")
        assert len(ar.token_ids) == len(spec.token_ids) == max_new and ar.finish_reason == "length"


def test_greedy_spec_equals_ar_with_eos_and_stop(model, tie_aware):
    eos = (5, 17, 42, 99, 123)  # common enough in random outputs to stop inside accepted prefixes
    for i, prompt in enumerate(random_prompts(20, seed=7)):
        ar = generate(model, prompt, GenerationConfig("ar", max_new_tokens=60, eos_token_ids=eos))
        spec = generate(model, prompt, GenerationConfig("spec", max_new_tokens=60, eos_token_ids=eos))
        if tie_aware.check(prompt, ar.token_ids, spec.token_ids, f"eos prompt {i}"):
            assert spec.finish_reason == ar.finish_reason
        if ar.finish_reason == "stop":
            assert ar.token_ids[-1] in eos and not set(ar.token_ids[:-1]) & set(eos)


def _assert_cache_equals_prefill(model, prompt, cache, tokens):
    fresh = DecodeSession(model, Prompt(prompt.input_ids + tokens[: cache.length - len(prompt.input_ids)],
                                        prompt.pixel_values, prompt.image_grid_thw))
    fresh.prefill()
    assert fresh.cache.length == cache.length
    for layer in range(model.config.text.num_hidden_layers):
        for got, want in zip(cache.read(layer), fresh.cache.read(layer)):
            # float32, same math with different matmul shapes (row-blocked vs whole prompt)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("with_image", [False, True])
def test_cache_after_partial_spec_acceptance_equals_fresh_prefill(model, with_image):
    prompt = random_prompts(3, seed=3)[2 if with_image else 0]
    cache = DenseKVCache(model.config.text.num_hidden_layers)
    res = generate(model, prompt, GenerationConfig("spec", max_new_tokens=45, block_size=8, eos_token_ids=()), cache=cache)
    assert any(0 < k < 7 for k in res.accepted_lengths), res.accepted_lengths  # some partial acceptance
    assert cache.length == len(prompt.input_ids) + len(res.token_ids) - 1 or res.finish_reason == "length"
    _assert_cache_equals_prefill(model, prompt, cache, res.token_ids)


@pytest.mark.parametrize("threshold", [0.5, 0.9])
def test_cache_after_mdm_block_equals_fresh_prefill(model, threshold):
    prompt = random_prompts(1, seed=5)[0]
    cache = DenseKVCache(model.config.text.num_hidden_layers)
    cfg = GenerationConfig("mdm", max_new_tokens=16 + 5, block_size=16, threshold=threshold, eos_token_ids=())
    res = generate(model, prompt, cfg, cache=cache)
    assert len(res.token_ids) == 21
    assert cache.length == len(prompt.input_ids) + 16  # the first block was written, the last not
    _assert_cache_equals_prefill(model, prompt, cache, res.token_ids)


class ForwardCounter:
    def __init__(self, model):
        self.calls = 0
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1


@pytest.mark.parametrize("algorithm", ["ar", "mdm", "spec"])
@pytest.mark.parametrize("max_new", [1, 2, 13, 40])
def test_nfe_counts_every_forward_after_prefill(model, algorithm, max_new):
    for prompt in random_prompts(3, seed=max_new):
        counter = ForwardCounter(model)
        try:
            res = generate(model, prompt, GenerationConfig(algorithm, max_new_tokens=max_new, block_size=8, eos_token_ids=()))
        finally:
            counter.handle.remove()
        assert res.nfe == counter.calls - 1  # minus the prefill
        assert res.tokens_per_nfe == len(res.token_ids) / max(res.nfe, 1)
        if algorithm == "ar":
            assert res.nfe == max_new - 1


def test_mdm_nfe_closed_form_when_one_token_per_step(model):
    # threshold 1.0: no confidence exceeds it, so each iteration commits exactly one token:
    # a block of B costs B - 1 iterations plus one causal KV write (none after the last block).
    prompt = random_prompts(1, seed=9)[0]
    res = generate(model, prompt, GenerationConfig("mdm", max_new_tokens=24, block_size=8, threshold=1.0, eos_token_ids=()))
    assert len(res.token_ids) == 24
    assert res.nfe == 3 * 7 + 2


def test_mdm_low_threshold_needs_fewer_forwards(model):
    prompt = random_prompts(1, seed=10)[0]
    hi = generate(model, prompt, GenerationConfig("mdm", max_new_tokens=32, block_size=16, threshold=1.0, eos_token_ids=()))
    lo = generate(model, prompt, GenerationConfig("mdm", max_new_tokens=32, block_size=16, threshold=0.0, eos_token_ids=()))
    # threshold 0 commits a whole sub-block per iteration
    assert lo.nfe < hi.nfe and lo.nfe == 2 * 2 + 1


def test_mdm_decodes_full_blocks_cut_at_the_budget(model):
    # The server denoises every block whole and only then cuts it at max_new_tokens, and the
    # masked tail is bidirectional context for the filled positions: a shorter last block would
    # decode different tokens. So a budget inside a block gives a prefix of the longer run.
    for i, prompt in enumerate(random_prompts(6, seed=20)):
        cfg = GenerationConfig("mdm", max_new_tokens=64, block_size=32, eos_token_ids=())
        full = generate(model, prompt, cfg)
        assert len(full.token_ids) == 64
        for budget in (5, 33, 50):
            cut = generate(model, prompt, dataclasses.replace(cfg, max_new_tokens=budget))
            assert cut.token_ids == full.token_ids[:budget] and cut.finish_reason == "length", (i, budget)


def test_mdm_early_exit_changes_no_token(model, monkeypatch):
    """Denoising stops once the filled prefix of a block holds a stop or reaches the budget; the
    output must equal that of completing the block (what the server does), with fewer forwards."""
    eos = (5, 17, 42, 99, 123)
    saved, stopped = 0, 0
    for prompt in random_prompts(12, seed=21):
        for budget in (13, 40):
            cfg = GenerationConfig("mdm", max_new_tokens=budget, block_size=16, eos_token_ids=eos)
            early = generate(model, prompt, cfg)
            with monkeypatch.context() as patch:
                patch.setattr(mdm, "_ends_inside", lambda *_: False)
                whole = generate(model, prompt, cfg)
            assert (early.token_ids, early.finish_reason) == (whole.token_ids, whole.finish_reason)
            assert early.nfe <= whole.nfe
            saved += early.nfe < whole.nfe
            stopped += early.finish_reason == "stop"
    assert saved and stopped  # both exits were taken


def _favour_mask(mask_id):
    """lm_head hook: the mask token becomes the argmax at every position of every forward."""
    def hook(module, args, output):
        output = output.clone()
        output[..., mask_id] = output.max() + 1
        return output
    return hook


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_mdm_never_emits_the_mask_token(model, temperature):
    # The mask logit is ruled out before softmax/argmax/sampling (the first token of a block too),
    # so however large it is the answer is the one the unmodified model gives, and it ends.
    mask_id = model.config.mask_token_id
    cfg = GenerationConfig("mdm", max_new_tokens=40, block_size=8, eos_token_ids=(),
                           sampling=SamplingParams(temperature=temperature, seed=3))
    for prompt in random_prompts(3, seed=22):
        plain = generate(model, prompt, cfg)
        handle = model.lm_head.register_forward_hook(_favour_mask(mask_id))
        try:
            favoured = generate(model, prompt, cfg)
        finally:
            handle.remove()
        assert mask_id not in favoured.token_ids and len(favoured.token_ids) == 40
        assert favoured.token_ids == plain.token_ids


def test_greedy_spec_equals_ar_with_logit_adjustments(model, tie_aware):
    """AR's logit adjustments apply at every verify position of spec as at every AR step: greedy
    spec == greedy AR with the same adjustments. The bias bans each prompt's unbiased second
    token and favours two others; min_new_tokens holds every EOS off for 15 tokens; the
    penalties count the output and the drafts before each position."""
    eos = (5, 17, 42, 99, 123)
    penalties_bit = 0
    for i, prompt in enumerate(random_prompts(9, seed=23)):
        plain = generate(model, prompt, GenerationConfig("ar", max_new_tokens=30, eos_token_ids=()))
        bias = ((plain.token_ids[1], -100.0), (7, 2.5), (11, 1.5))
        params = SamplingParams(logit_bias=bias, min_new_tokens=15)
        ar = generate(model, prompt, GenerationConfig("ar", max_new_tokens=30, sampling=params, eos_token_ids=eos))
        for block in (4, 32):
            spec = generate(model, prompt, GenerationConfig("spec", max_new_tokens=30, block_size=block,
                                                            sampling=params, eos_token_ids=eos))
            tie_aware.check(prompt, ar.token_ids, spec.token_ids, f"adjusted prompt {i}, block {block}")
        assert plain.token_ids[1] not in ar.token_ids
        assert len(ar.token_ids) >= 15 and not set(ar.token_ids[:14]) & set(eos)
        penalised = SamplingParams(frequency_penalty=0.7, presence_penalty=0.4, repetition_penalty=1.4)
        ar = generate(model, prompt, GenerationConfig("ar", max_new_tokens=30, sampling=penalised, eos_token_ids=()))
        penalties_bit += ar.token_ids != plain.token_ids  # only where the plain answer repeats a token
        for block in (4, 32):
            spec = generate(model, prompt, GenerationConfig("spec", max_new_tokens=30, block_size=block,
                                                            sampling=penalised, eos_token_ids=()))
            tie_aware.check(prompt, ar.token_ids, spec.token_ids, f"penalised prompt {i}, block {block}")
    assert penalties_bit >= 3, penalties_bit


def test_adjust_logits_is_ar_s_order_of_operations():
    from fast_dvlm_sglang.decoding.sampling import adjust_logits

    logits = torch.randn(5, 20, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(logit_bias=((3, 1.5), (19, -2.0)), min_new_tokens=6)
    got = adjust_logits(logits, params, produced=3, stop_token_ids=(4, 8, 25))  # 25: past the vocabulary
    want = logits.clone()
    want[:3, [4, 8]] = float("-inf")  # positions choosing output tokens 3, 4, 5 (< 6)
    want[:, 3] += 1.5
    want[:, 19] -= 2.0
    assert torch.equal(got, want) and not torch.equal(logits, got)
    assert torch.equal(adjust_logits(logits, params, produced=6, stop_token_ids=(4,))[:, 4], logits[:, 4])
    assert adjust_logits(logits, SamplingParams(), 0, (4,)) is logits  # nothing to do: no copy
    # penalties: position j counts the history and the row's tokens before it
    pen = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25, repetition_penalty=2.0)
    penalised = adjust_logits(logits, pen, 2, history=[3, 3], row_tokens=torch.tensor([7, 3, 7, 1]))
    for j, before in enumerate([[3, 3], [3, 3, 7], [3, 3, 7, 3], [3, 3, 7, 3, 7], [3, 3, 7, 3, 7, 1]]):
        row = logits[j].clone()
        for t in set(before):
            row[t] -= 0.5 * before.count(t) + 0.25
            row[t] = row[t] * 2.0 if row[t] < 0 else row[t] / 2.0
        torch.testing.assert_close(penalised[j], row, rtol=0, atol=1e-6)
    assert torch.equal(adjust_logits(logits[0], params, 0, (4,)), got[0].where(torch.arange(20) != 8, logits[0, 8]))


@pytest.mark.parametrize("seed", range(4))
def test_sample_rows_draws_what_each_row_draws_alone(seed):
    """Rows sharing sampling parameters draw together (one distribution computation), each the
    exact token its own generator draws from its row alone, and each generator advances as alone."""
    from fast_dvlm_sglang.decoding.sampling import sample_rows, sample_tokens

    gen = torch.Generator().manual_seed(seed)
    for vocab in (3, 64, 1000):
        rows = int(torch.randint(1, 9, (), generator=gen))
        logits = torch.randn(rows, vocab, generator=gen) * 4
        logits[0, :2] = logits[0, 2 % vocab]  # ties
        for params in (SamplingParams(temperature=0.7), SamplingParams(temperature=1.3, top_p=0.6),
                       SamplingParams(temperature=0.9, top_k=5, top_p=0.9, min_p=0.05), SamplingParams()):
            seeds = [int(s) for s in torch.randint(0, 2**31, (rows,), generator=gen)]
            together = sample_rows(logits, params, [torch.Generator().manual_seed(s) for s in seeds])
            for i, s in enumerate(seeds):
                alone = torch.Generator().manual_seed(s)
                assert int(together[i]) == int(sample_tokens(logits[i:i + 1], params, alone)[0]), (vocab, params, i)
            if not params.greedy:  # the same seeds draw the same tokens again
                again = sample_rows(logits, params, [torch.Generator().manual_seed(s) for s in seeds])
                assert torch.equal(together, again)


def test_prior_tokens_count_as_output_before_the_first_position():
    """An AR run's step j adjusts one position after the committed output and its j earlier steps
    (on the device): what the last of j + 1 consecutive positions gets with those steps as its row."""
    from fast_dvlm_sglang.decoding.sampling import adjust_logits

    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 30, generator=gen)
    params = SamplingParams(frequency_penalty=0.4, presence_penalty=0.2, repetition_penalty=1.3, min_new_tokens=6,
                            logit_bias=((2, 1.0),))
    history = [5, 5, 9]
    for step in range(5):
        steps = torch.randint(0, 30, (step,), generator=gen)
        one = adjust_logits(logits, params, len(history) + step, (4,), history=history,
                            prior_tokens=steps if step else None)
        last = adjust_logits(logits.expand(step + 1, 30), params, len(history), (4,), history=history,
                             row_tokens=steps if step else None)[-1:]
        assert torch.equal(one, last), step
        assert (one[0, 4] == float("-inf")) == (len(history) + step < 6)


def test_mdm_refuses_output_dependent_adjustments(model):
    prompt = random_prompts(1, seed=5)[0]
    for params in (SamplingParams(min_new_tokens=4), SamplingParams(repetition_penalty=1.2),
                   SamplingParams(frequency_penalty=0.5)):
        with pytest.raises(ValueError, match="mdm does not support"):
            generate(model, prompt, GenerationConfig("mdm", max_new_tokens=8, sampling=params))


@pytest.mark.parametrize("seed", range(3))
def test_mdm_logit_bias_is_a_shift_of_every_positions_logits(model, seed):
    """A bias is the same at every position: banning tokens of the plain answer removes them; a
    bias that is the same constant on every token changes nothing (softmax is shift-invariant,
    so the confidences and choices are the plain ones, token for token)."""
    prompt = random_prompts(1, seed=seed)[0]
    plain = generate(model, prompt, GenerationConfig("mdm", max_new_tokens=24)).token_ids
    banned = sorted(set(plain[:4]))
    biased = generate(model, prompt, GenerationConfig("mdm", max_new_tokens=24, sampling=SamplingParams(
        logit_bias=tuple((t, -1e4) for t in banned)))).token_ids
    assert not set(banned) & set(biased) and biased != plain
    vocab = model.config.text.vocab_size
    flat = generate(model, prompt, GenerationConfig("mdm", max_new_tokens=24, sampling=SamplingParams(
        logit_bias=tuple((t, 0.5) for t in range(vocab))))).token_ids
    assert flat == plain


@pytest.mark.parametrize("seed", range(5))
def test_min_p_keeps_exactly_the_tokens_within_min_p_of_the_likeliest(seed):
    from fast_dvlm_sglang.decoding.sampling import sampling_probs

    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 50, generator=gen) * 3
    for min_p in (0.05, 0.3, 0.9):
        params = SamplingParams(temperature=0.7, min_p=min_p)
        probs = sampling_probs(logits, params)
        base = torch.softmax(logits / 0.7, dim=-1)
        keep = base >= min_p * base.max(dim=-1, keepdim=True).values
        assert torch.equal(probs > 0, keep)
        torch.testing.assert_close(probs, torch.where(keep, base, 0) / torch.where(keep, base, 0).sum(-1, keepdim=True))


def test_seeded_spec_sampling_with_min_p_and_bias_stays_inside_their_support(model):
    """Sampled spec with min_p and a ban: reproducible with a seed, and the banned token never comes."""
    prompt = random_prompts(1, seed=5)[0]

    def run(seed):
        params = SamplingParams(temperature=1.2, min_p=0.05, seed=seed, logit_bias=((9, -1e9),))
        return generate(model, prompt, GenerationConfig("spec", max_new_tokens=40, sampling=params,
                                                        eos_token_ids=())).token_ids
    runs = [run(s) for s in range(4)]
    assert run(0) == runs[0] and len({tuple(r) for r in runs}) > 1
    assert all(9 not in r for r in runs)


@pytest.mark.parametrize("algorithm", ["ar", "mdm", "spec"])
def test_sampling_is_reproducible_with_a_seed(model, algorithm):
    prompt = random_prompts(1, seed=11)[0]
    def run(seed):
        params = SamplingParams(temperature=1.5, top_p=0.95, top_k=50, seed=seed)
        return generate(model, prompt, GenerationConfig(algorithm, max_new_tokens=30, sampling=params, eos_token_ids=())).token_ids
    first = run(1)
    assert run(1) == first
    assert any(run(s) != first for s in (2, 3, 4))


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError, match="unknown algorithm"):
        GenerationConfig("beam")
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationConfig("ar", max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="min_p"):
        SamplingParams(min_p=1.5)
    with pytest.raises(ValueError, match="min_new_tokens"):
        SamplingParams(min_new_tokens=-1)
    with pytest.raises(ValueError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=0)


def test_greedy_spec_in_ar_runs_equals_ar(model):
    """AR runs (`DraftPolicy.ar_run`: r AR steps in one round, each a one-token causal forward)
    are AR steps: with a cost model whose per-round bookkeeping dwarfs a forward and no draft
    width to choose from, greedy spec equals greedy AR token for token (the same one-token
    forwards: no near-tie allowance), plain and with logit adjustments, at one forward per
    token, in rounds of 8 tokens (the last one what the budget leaves)."""
    from fast_dvlm_sglang.decoding.draft_policy import DraftPolicy, ForwardCost

    policy = DraftPolicy(block_size=32, cost=ForwardCost(base=0.001, per_token=1e-6, per_round=0.1), widths=(1,))
    penalised = SamplingParams(frequency_penalty=0.7, presence_penalty=0.4, logit_bias=((7, 2.5),))
    for i, prompt in enumerate(random_prompts(9, seed=31)):
        for params in (SamplingParams(), penalised):
            ar = generate(model, prompt, GenerationConfig("ar", max_new_tokens=37, sampling=params, eos_token_ids=()))
            spec = generate(model, prompt, GenerationConfig("spec", max_new_tokens=37, sampling=params,
                                                            draft_policy=policy, eos_token_ids=()))
            assert spec.token_ids == ar.token_ids, f"AR runs, prompt {i}"
            assert spec.accepted_lengths == [7, 7, 7, 7, 3], spec.accepted_lengths  # 36 tokens after the seed
            assert spec.nfe == 36
