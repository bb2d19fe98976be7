"""`cpu_attention.extend_attention` equals SGLang's torch_native extend attention (the square
"redundant query" form it replaces for our layers), and `cpu_attention.forward_decode` is
SGLang's decode attention bit for bit, over awkward shapes."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.sglang

import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 70), st.integers(1, 40)), min_size=1, max_size=5),
       st.sampled_from([(4, 4), (4, 2), (6, 1)]), st.sampled_from([8, 16]), st.booleans(), st.integers(0, 2**31 - 1))
def test_extend_attention_equals_sglangs_square_form(rows, heads, dim, causal, seed):
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    from fast_dvlm_sglang.sglang_plugin.cpu_attention import extend_attention

    gen = torch.Generator().manual_seed(seed)
    q_heads, kv_heads = heads
    slots = 600
    k_cache = torch.randn(slots, kv_heads, dim, generator=gen)
    v_cache = torch.randn(slots, kv_heads, dim, generator=gen)
    req_to_token = torch.randperm(slots, generator=gen)[: len(rows) * 110].view(len(rows), 110).int()  # as SGLang's
    prefix, new = [p for p, _ in rows], [n for _, n in rows]
    q = torch.randn(sum(new), q_heads, dim, generator=gen)
    pool_idx = torch.arange(len(rows)).flip(0)  # rows not in pool order
    got = extend_attention(q, k_cache, v_cache, req_to_token, pool_idx, prefix, new, scaling=dim ** -0.5,
                           enable_gqa=q_heads != kv_heads, causal=causal)
    want = torch.empty_like(got)
    TorchNativeAttnBackend._run_sdpa_forward_extend(
        None, q, want, k_cache, v_cache, req_to_token, pool_idx, torch.tensor([p + n for p, n in rows]),
        torch.tensor(prefix), torch.tensor(new), scaling=dim ** -0.5, enable_gqa=q_heads != kv_heads, causal=causal)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # float32: same sums, other blocking


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 70), st.sampled_from([1, 2, 3, 32])), min_size=1, max_size=6),
       st.integers(0, 2**31 - 1))
def test_shared_additive_masks_are_each_requests_offset_causal_mask(rows, seed):
    """Each request's view of its width's shared additive mask is its offset causal mask (query t
    sees keys 0 .. prefix + t), and attention under it is bitwise attention under the boolean
    form of that mask (what SGLang's and our earlier loop passed)."""
    from torch.nn.functional import scaled_dot_product_attention

    from fast_dvlm_sglang.sglang_plugin.cpu_attention import _offset_causal_masks, extend_attention

    prefix, new = [p for p, _ in rows], [n for _, n in rows]
    masks = _offset_causal_masks(prefix, new, torch.float32, torch.device("cpu"))
    assert set(masks) == {n for n in new if n > 1}
    gen = torch.Generator().manual_seed(seed)
    k_cache, v_cache = torch.randn(800, 2, 8, generator=gen), torch.randn(800, 2, 8, generator=gen)
    req_to_token = torch.randperm(800, generator=gen)[: len(rows) * 110].view(len(rows), 110).int()
    q = torch.randn(sum(new), 4, 8, generator=gen)
    got = extend_attention(q, k_cache, v_cache, req_to_token, torch.arange(len(rows)), prefix, new,
                           scaling=0.3, enable_gqa=True, causal=True)
    start = 0
    for i, (p, n) in enumerate(rows):
        visible = torch.arange(p + n)[None, :] <= p + torch.arange(n)[:, None]
        if n > 1:
            view = masks[n][:, -(p + n):]
            assert torch.equal(view == 0, visible) and bool((view[~visible] == float("-inf")).all())
        slots = req_to_token[i, :p + n].long()
        want = scaled_dot_product_attention(
            q[start:start + n].movedim(0, 1)[None], k_cache[slots].movedim(0, 1)[None],
            v_cache[slots].movedim(0, 1)[None], attn_mask=visible if n > 1 else None, scale=0.3, enable_gqa=True)
        assert torch.equal(got[start:start + n], want[0].movedim(1, 0))
        start += n


def test_hook_takes_only_our_layers():
    from types import SimpleNamespace

    from fast_dvlm_sglang.sglang_plugin import cpu_attention

    calls = []
    original = lambda *a, **kw: calls.append("sglang")  # noqa: E731
    other = SimpleNamespace(is_cross_attention=False, sliding_window_size=None, qk_head_dim=8, v_head_dim=8)
    fb = SimpleNamespace(extend_seq_lens_cpu=[1])
    cpu_attention.forward_extend(original, None, None, None, None, other, fb)
    assert calls == ["sglang"]


class _Pool:
    """The KV pool calls the backend makes (an MHA pool's set/get of one layer's buffers)."""

    def __init__(self, k_cache, v_cache):
        self.k, self.v, self.writes = k_cache, v_cache, []

    def set_kv_buffer(self, layer, loc, k, v):
        self.writes.append(loc.loc.clone())
        self.k[loc.loc] = k.view(-1, *self.k.shape[1:])
        self.v[loc.loc] = v.view(-1, *self.v.shape[1:])

    def get_key_buffer(self, layer_id):
        return self.k

    def get_value_buffer(self, layer_id):
        return self.v


class _OurLayer:
    """What `cpu_attention` checks of a layer: a mode-selected (our model's) causal layer."""

    _fast_dvlm_causal_forward = None  # (`model.is_mode_selected` reads the class)
    is_cross_attention = False
    sliding_window_size = -1
    layer_id = 0

    def __init__(self, q_heads, kv_heads, dim):
        self.tp_q_head_num, self.tp_k_head_num, self.qk_head_dim, self.v_head_dim = q_heads, kv_heads, dim, dim
        self.scaling = dim ** -0.5


def _decode_case(seq_lens, heads, dim, seed, dtype=torch.float32):
    """A backend (SGLang's class, its state stubbed) over a pool of shuffled slots, a decode batch
    whose request i's new token goes to slot seq_lens[i] - 1 of its row, and that token's q/k/v."""
    from types import SimpleNamespace

    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    gen = torch.Generator().manual_seed(seed)
    q_heads, kv_heads = heads
    slots, width = 1000, 130
    k_cache = torch.randn(slots, kv_heads, dim, generator=gen).to(dtype)
    v_cache = torch.randn(slots, kv_heads, dim, generator=gen).to(dtype)
    # int32, as SGLang's ReqToTokenPool holds it
    req_to_token = torch.randperm(slots, generator=gen)[: (len(seq_lens) + 1) * width].view(-1, width).int()
    pool_idx = torch.randperm(len(seq_lens) + 1, generator=gen)[: len(seq_lens)]  # rows not in pool order
    lens = torch.tensor(seq_lens)
    backend = TorchNativeAttnBackend.__new__(TorchNativeAttnBackend)
    backend.token_to_kv_pool = _Pool(k_cache, v_cache)
    backend.req_to_token_pool = SimpleNamespace(req_to_token=req_to_token)
    backend.swa_out_cache_loc = None
    batch = SimpleNamespace(req_pool_indices=pool_idx, seq_lens=lens, seq_lens_cpu=lens.clone(), encoder_lens=None,
                            out_cache_loc=req_to_token[pool_idx, lens - 1], encoder_out_cache_loc=None)
    q = torch.randn(len(seq_lens), q_heads * dim, generator=gen)
    k = torch.randn(len(seq_lens), kv_heads * dim, generator=gen).to(dtype)
    v = torch.randn(len(seq_lens), kv_heads * dim, generator=gen).to(dtype)
    return backend, batch, _OurLayer(q_heads, kv_heads, dim), q, k, v


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 130), min_size=1, max_size=6), st.sampled_from([(4, 4), (4, 2), (6, 1)]),
       st.sampled_from([8, 16]), st.sampled_from([torch.float32, torch.bfloat16]), st.integers(0, 2**31 - 1))
def test_decode_hook_is_sglangs_decode_attention(seq_lens, heads, dim, kv_dtype, seed):
    """The hook's output (and the KV it writes) equals SGLang's own `forward_decode` on the same
    backend state, bitwise: the same SDPA calls on the same operands, only gathered otherwise
    (a bf16 KV cache under float32 queries: converted as SGLang converts it)."""
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    from fast_dvlm_sglang.sglang_plugin import cpu_attention

    ours, batch, layer, q, k, v = _decode_case(seq_lens, heads, dim, seed, kv_dtype)
    sglangs, *_ = _decode_case(seq_lens, heads, dim, seed, kv_dtype)
    original = TorchNativeAttnBackend.forward_decode
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    got = cpu_attention.forward_decode(spy, ours, q, k, v, layer, batch)
    want = original(sglangs, q, k, v, layer, batch)
    assert not calls  # our layer: SGLang's loop did not run
    assert got.shape == want.shape == (len(seq_lens), heads[0] * dim)
    assert torch.equal(got, want)
    assert torch.equal(ours.token_to_kv_pool.k, sglangs.token_to_kv_pool.k)  # the new tokens' KV, written
    assert torch.equal(ours.token_to_kv_pool.v, sglangs.token_to_kv_pool.v)
    assert [w.tolist() for w in ours.token_to_kv_pool.writes] == [batch.out_cache_loc.tolist()]


def test_decode_hook_leaves_other_layers_and_batches_to_sglang():
    from fast_dvlm_sglang.sglang_plugin import cpu_attention

    backend, batch, layer, q, k, v = _decode_case([5, 9], (4, 2), 8, 0)
    calls = []
    original = lambda *a, **kw: calls.append("sglang")  # noqa: E731

    class Other:  # another model's layer (not mode-selected)
        is_cross_attention, sliding_window_size, qk_head_dim, v_head_dim = False, -1, 8, 8

    windowed = _OurLayer(4, 2, 8)
    windowed.sliding_window_size = 16
    cross = _OurLayer(4, 2, 8)
    cross.is_cross_attention = True
    for other in (Other(), windowed, cross):
        cpu_attention.forward_decode(original, backend, q, k, v, other, batch)
    no_host_lens = type(batch)(**{**vars(batch), "seq_lens_cpu": None})
    cpu_attention.forward_decode(original, backend, q, k, v, layer, no_host_lens)
    cpu_attention.forward_decode(original, backend, q.to("meta"), k, v, layer, batch)  # not a CPU tensor
    assert calls == ["sglang"] * 5
    assert backend.token_to_kv_pool.writes == []
