"""`cpu_attention.extend_attention` equals SGLang's torch_native extend attention (the square
"redundant query" form it replaces for our layers), over awkward shapes."""

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
    req_to_token = torch.randperm(slots, generator=gen)[: len(rows) * 110].view(len(rows), 110)
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


def test_hook_takes_only_our_layers():
    from types import SimpleNamespace

    from fast_dvlm_sglang.sglang_plugin import cpu_attention

    calls = []
    original = lambda *a, **kw: calls.append("sglang")  # noqa: E731
    other = SimpleNamespace(is_cross_attention=False, sliding_window_size=None, qk_head_dim=8, v_head_dim=8)
    fb = SimpleNamespace(extend_seq_lens_cpu=[1])
    cpu_attention.forward_extend(original, None, None, None, None, other, fb)
    assert calls == ["sglang"]
