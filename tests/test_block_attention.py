"""The block-diffusion attention kernel against a float64 reference with an explicit mask.

On CPU the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1); on a
GPU the same file runs compiled (`pytest tests/test_block_attention.py` with CUDA visible).

Tolerances, from the arithmetic: float32 inputs give float32 dot products and an online softmax
in float32 over at most a few hundred keys whose values are N(0, 1), so the error is a few hundred
ulps of outputs of magnitude <= ~3: 5e-5 absolute. float16 inputs are shared with the reference
(it upcasts the same tensors); the kernel rounds the softmax weights to float16 before the PV
product (2^-11 relative) and the output to float16 (|o| <= ~3): 4e-3 absolute.
"""

from __future__ import annotations

import random

import pytest
import torch

from fast_dvlm_sglang.kernels.block_attention import (
    BlockAttentionConfig,
    block_attention,
    block_attention_reference,
    key_slots,
    split_rows,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
UNSPLIT = BlockAttentionConfig(block_n=16, max_splits=1)
# Splits of >= 16 keys so that short test contexts are cut into several ranges.
SPLIT = BlockAttentionConfig(block_n=16, max_splits=4, min_split_keys=16, max_split_query=8)
ATOL = {torch.float32: 5e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def make_case(prefixes, q_lens, *, q_heads=4, kv_heads=2, head_dim=16, page_size=1, dtype=torch.float32,
              seed=0, extra_rows=3):
    """A KV pool as SGLang lays it out: slot 0 a dummy, each request's pages at shuffled places,
    its table row at a shuffled row of `req_to_token`; the new tokens' K/V already written."""
    gen = torch.Generator().manual_seed(seed)
    seq = [p + n for p, n in zip(prefixes, q_lens)]
    pages_needed = sum(-(-s // page_size) for s in seq)
    num_pages = pages_needed + 4
    order = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()  # page 0 holds the dummy slot
    width = max(seq + [1]) + page_size
    rows = torch.randperm(len(seq) + extra_rows, generator=gen)[:len(seq)]
    req_to_token = torch.zeros((len(seq) + extra_rows, width), dtype=torch.int32)
    for b, s in enumerate(seq):
        mine = [order.pop() for _ in range(-(-s // page_size))]
        j = torch.arange(len(mine) * page_size)
        req_to_token[rows[b], :len(j)] = (torch.tensor(mine)[j // page_size] * page_size + j % page_size).int()
    slots = num_pages * page_size
    tokens = sum(q_lens)
    q = torch.randn(tokens, q_heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(slots, kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(slots, kv_heads, head_dim, generator=gen).to(dtype)
    lens = torch.tensor(q_lens, dtype=torch.int32)
    tensors = dict(q=q, k_cache=k, v_cache=v, req_to_token=req_to_token, req_pool_indices=rows.int(),
                   q_start=(torch.cumsum(lens, 0) - lens).int(), q_lens=lens,
                   seq_lens=torch.tensor(seq, dtype=torch.int32))
    return {name: t.to(DEVICE) for name, t in tensors.items()}


def run(case, *, causal, page_size=1, config=UNSPLIT, poison=True):
    q = case["q"]
    out = torch.full((q.shape[0], q.shape[1], case["v_cache"].shape[-1]), float("nan"), dtype=q.dtype, device=DEVICE)
    if not poison:
        out = None
    max_q = int(case["q_lens"].max()) if case["q_lens"].numel() else 0
    return block_attention(*case.values(), max_q_len=max_q, causal=causal, page_size=page_size, out=out, config=config)


def check(case, out, *, causal, page_size=1):
    ref = block_attention_reference(*case.values(), causal=causal, page_size=page_size)
    assert not torch.isnan(out).any(), "some output element was never written"
    torch.testing.assert_close(out.double(), ref, atol=ATOL[case["q"].dtype], rtol=0)


def random_lengths(rng, n, *, max_prefix=70, max_new=33):
    prefixes = [rng.choice([0, rng.randrange(1, max_prefix)]) for _ in range(n)]
    return prefixes, [rng.randint(1, max_new) for _ in range(n)]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("ratio", [1, 2, 8])
@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_mixed_batch_matches_reference(page_size, ratio, causal):
    rng = random.Random(page_size * 100 + ratio)
    prefixes, q_lens = random_lengths(rng, 3)
    kv_heads = 1 if ratio == 8 else 2
    case = make_case(prefixes, q_lens, q_heads=ratio * kv_heads, kv_heads=kv_heads, page_size=page_size,
                     seed=ratio + page_size)
    check(case, run(case, causal=causal, page_size=page_size), causal=causal, page_size=page_size)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_every_block_length_1_to_33(causal):
    """One launch, 33 requests with 1..33 new tokens over contexts ending at every page offset."""
    q_lens = list(range(1, 34))
    prefixes = [(5 * n) % 23 for n in q_lens]
    case = make_case(prefixes, q_lens, page_size=4, seed=3)
    check(case, run(case, causal=causal, page_size=4), causal=causal, page_size=4)


@pytest.mark.parametrize("page_size", [1, 16])
def test_single_token_decode_and_zero_context(page_size):
    """AR decode steps (one query each, some with no context at all: the first token)."""
    case = make_case([0, 1, 15, 16, 17, 40], [1] * 6, page_size=page_size, seed=4)
    check(case, run(case, causal=True, page_size=page_size), causal=True, page_size=page_size)
    case = make_case([0, 0], [5, 32], page_size=page_size, seed=5)  # prefills with no cached prefix
    for causal in (True, False):
        check(case, run(case, causal=causal, page_size=page_size), causal=causal, page_size=page_size)


def test_requests_without_new_tokens_are_skipped():
    """Rows of requests that bring no token (q_len 0, even with no context) are not touched."""
    case = make_case([10, 0, 7, 0], [4, 0, 3, 0], seed=6)
    out = run(case, causal=True)
    check(case, out, causal=True)
    assert out.shape[0] == 7


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("page_size", [1, 4])
def test_split_kv_matches_reference(page_size, causal):
    """Long contexts with few new tokens are split across programs and merged in order; a prefill
    in the same launch is not split."""
    case = make_case([150, 37, 3, 90], [1, 8, 2, 20], page_size=page_size, seed=7)
    rows = split_rows(case["q_lens"], case["seq_lens"], SPLIT).tolist()
    assert rows == [0, 1, -1, -1]  # 151 and 45 keys split; 5 keys too few; 20 new tokens: a prefill
    check(case, run(case, causal=causal, page_size=page_size, config=SPLIT), causal=causal, page_size=page_size)


@pytest.mark.parametrize("config", [UNSPLIT, SPLIT], ids=["unsplit", "split"])
def test_a_row_does_not_depend_on_its_launch(config):
    """Each request computed alone gives bit-identical rows to the same request inside a batch,
    and a repeated launch gives the same bits (fixed reduction order, no atomics)."""
    rng = random.Random(11)
    for trial in range(2):
        prefixes, q_lens = random_lengths(rng, 4, max_prefix=120, max_new=12)
        case = make_case(prefixes, q_lens, seed=20 + trial)
        together = run(case, causal=trial != 1, config=config)
        assert torch.equal(together, run(case, causal=trial != 1, config=config))
        for b in range(len(q_lens)):
            alone = {**case, "req_pool_indices": case["req_pool_indices"][b:b + 1],
                     "q_start": torch.zeros(1, dtype=torch.int32, device=DEVICE),
                     "q_lens": case["q_lens"][b:b + 1], "seq_lens": case["seq_lens"][b:b + 1]}
            start = int(case["q_start"][b])
            alone["q"] = case["q"][start:start + q_lens[b]].contiguous()
            assert torch.equal(run(alone, causal=trial != 1, config=config), together[start:start + q_lens[b]])


def test_unusual_head_shapes():
    """A non-power-of-two head ratio (3) and head dimension (24), and the 3B's 16/2 x 128."""
    case = make_case([9, 30], [6, 17], q_heads=6, kv_heads=2, head_dim=24, seed=8)
    check(case, run(case, causal=True), causal=True)
    case = make_case([40], [32], q_heads=16, kv_heads=2, head_dim=128, seed=9)
    check(case, run(case, causal=False), causal=False)


def test_float16():
    case = make_case([0, 45], [32, 3], dtype=torch.float16, seed=10)
    for causal in (True, False):
        check(case, run(case, causal=causal), causal=causal)


@pytest.mark.skipif(DEVICE != "cuda", reason="Triton's interpreter has no bfloat16 dot: GPU only")
def test_bfloat16_on_gpu():
    case = make_case([0, 300], [32, 32], q_heads=16, kv_heads=2, head_dim=128, dtype=torch.bfloat16, seed=12)
    for causal in (True, False):
        check(case, run(case, causal=causal, config=BlockAttentionConfig()), causal=causal)


def test_index_math_matches_the_documented_layout():
    """`key_slots` (the kernel's formula) recovers exactly the slots the pool builder placed."""
    case = make_case([13], [6], page_size=4, seed=13)
    row = int(case["req_pool_indices"][0])
    slots = key_slots(case["req_to_token"], row, 19, page_size=4)
    assert torch.equal(slots, case["req_to_token"][row, :19].long())
    assert len(set(slots.tolist())) == 19 and 0 not in slots.tolist()


def test_rejects_heads_that_do_not_divide():
    case = make_case([2], [2], q_heads=3, kv_heads=2, seed=14)
    with pytest.raises(ValueError, match="not a multiple"):
        run(case, causal=True)


def test_reference_model_through_the_kernel(tiny_dir):
    """`use_attention_kernel()`: the model's causal prefill, block-bidirectional draft and causal
    verify forwards over its dense cache give the SDPA path's logits (float32 tolerance of the
    attention, carried through two layers and the LM head), and greedy spec decodes the same."""
    from fast_dvlm_sglang.decoding import GenerationConfig, Prompt, generate
    from fast_dvlm_sglang.decoding.session import DecodeSession
    from fast_dvlm_sglang.model import FastDVLMForConditionalGeneration

    model = FastDVLMForConditionalGeneration.from_pretrained(tiny_dir).eval().to(DEVICE)
    prompt = Prompt(list(range(5, 40)))
    logits = {}
    for kernel in (False, True):
        model.use_attention_kernel(kernel)
        session = DecodeSession(model, prompt)
        first = session.prefill()
        draft = session.forward([7] * 8, bidirectional=True, write=False)
        verify = session.forward([7] * 8, bidirectional=False, write=True)
        logits[kernel] = torch.cat([first[None], draft, verify]).double()
    torch.testing.assert_close(logits[True], logits[False], atol=1e-4, rtol=0)
    outs = {}
    for kernel in (False, True):
        model.use_attention_kernel(kernel)
        outs[kernel] = generate(model, prompt, GenerationConfig(algorithm="spec", max_new_tokens=12)).token_ids
    model.use_attention_kernel(False)
    assert outs[True] == outs[False]


@pytest.mark.parametrize("causal", [True, False])
def test_dense_kernel_reads_a_longer_buffer_in_place(causal):
    """`dense_block_attention` on K/V that are the first S keys of a longer preallocated buffer
    (the forward benchmark's cache, a serving cache's layout): the same output as on contiguous
    copies, from the buffer itself (batch 3, GQA 4/2, S = 11 of 19)."""
    from fast_dvlm_sglang.kernels.block_attention import _keys_in_rows, dense_block_attention

    gen = torch.Generator().manual_seed(3)
    buf_k = torch.randn(3, 2, 19, 16, generator=gen, device="cpu").to(DEVICE)
    buf_v = torch.randn(3, 2, 19, 16, generator=gen, device="cpu").to(DEVICE)
    q = torch.randn(3, 4, 5, 16, generator=gen, device="cpu").to(DEVICE)
    k, v = buf_k[:, :, :11], buf_v[:, :, :11]
    assert not k.is_contiguous() and _keys_in_rows(k).data_ptr() == buf_k.data_ptr()  # no copy
    got = dense_block_attention(q, k, v, causal=causal, config=UNSPLIT)
    want = dense_block_attention(q, k.contiguous(), v.contiguous(), causal=causal, config=UNSPLIT)
    torch.testing.assert_close(got, want, atol=ATOL[torch.float32], rtol=0)
    assert _keys_in_rows(buf_k.transpose(2, 3)).is_contiguous()  # other layouts are copied
