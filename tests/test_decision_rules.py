"""Properties of the pure decision rules shared with the SGLang plugin."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fast_dvlm_sglang.decoding.mdm import confidence_unmask, shift_logits
from fast_dvlm_sglang.decoding.spec import accept_longest_prefix, committed_tokens
from fast_dvlm_sglang.decoding.stopping import StopCriteria, find_stop, visible_text


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 6), st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_accept_longest_prefix_matches_loop(batch, length, seed):
    gen = torch.Generator().manual_seed(seed)
    draft = torch.randint(0, 3, (batch, length), generator=gen)
    verify = torch.where(torch.rand(batch, length, generator=gen) < 0.7, draft, torch.randint(0, 3, (batch, length), generator=gen))
    draft_len = torch.randint(0, length + 1, (batch,), generator=gen)
    got = accept_longest_prefix(draft, verify, draft_len)
    for b in range(batch):
        k = 0
        while k < int(draft_len[b]) and draft[b, k] == verify[b, k]:
            k += 1
        assert int(got[b]) == k
    bonus = torch.randint(0, 3, (batch, 1), generator=gen)
    full_verify = torch.cat([verify, bonus], dim=1)
    toks = committed_tokens(draft, full_verify, got)
    for b in range(batch):
        k = int(got[b])
        assert toks[b, :k].tolist() == draft[b, :k].tolist()
        assert int(toks[b, k]) == int(full_verify[b, k])
        assert (toks[b, k + 1:] == -1).all()


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5), st.integers(1, 16), st.floats(0.0, 1.0), st.integers(0, 2**31 - 1))
def test_confidence_unmask_properties(batch, length, threshold, seed):
    gen = torch.Generator().manual_seed(seed)
    conf = torch.rand(batch, length, generator=gen)
    masked = torch.rand(batch, length, generator=gen) < 0.6
    active = torch.rand(batch, length, generator=gen) < 0.7
    out = confidence_unmask(conf, masked, active, threshold)
    cand = masked & active
    assert not (out & ~cand).any()  # only masked positions of the sub-block
    assert ((conf > threshold) & cand & ~out).sum() == 0  # every confident one is taken
    for b in range(batch):
        if cand[b].any():
            assert out[b].any()  # progress
            best = conf[b].masked_fill(~cand[b], -1).argmax()
            assert out[b, best]
        else:
            assert not out[b].any()


def test_shift_logits():
    x = torch.arange(12.0).view(1, 4, 3)
    s = shift_logits(x)
    assert torch.equal(s[0, 1:], x[0, :-1])


def test_stop_criteria():
    crit = StopCriteria(max_new_tokens=5, eos_token_ids=frozenset({9}))
    assert find_stop([1, 2], crit, None) is None
    assert find_stop([1, 9, 3, 4], crit, None) == (2, "stop")
    assert find_stop([1, 2, 3, 4, 5, 6], crit, None) == (5, "length")
    assert find_stop([1, 2, 3, 4, 5, 9], crit, None) == (5, "length")
    decode = lambda ids: "".join(chr(ord("a") + i) for i in ids)  # noqa: E731
    crit = StopCriteria(max_new_tokens=10, stop_strings=("cd",))
    assert find_stop([0, 1, 2, 3, 4], crit, decode) == (4, "stop")
    assert visible_text("abcde", ("cd",)) == "ab"
