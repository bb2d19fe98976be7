"""Attention of our model on SGLang's `torch_native` backend (the CPU path): extend in O(new x
context), decode with whole-row KV gathers.

SGLang 0.5.23's `TorchNativeAttnBackend._run_sdpa_forward_extend` runs, per request, a square
attention over the whole sequence: a "redundant" query of `seq_len` rows (prefix rows left
uninitialised) against all `seq_len` keys, and keeps the last `extend_len` rows. An extend of n
new tokens over a context of L therefore costs O(L^2) instead of O(n L). A prefill does not care
(n ~ L), but every speculative round and every chunk of a chunked prefill is an extend of a few
tokens over a long context: on the CPU a one-token round over a 1k-token context cost ~4x an AR
decode step (measured with `benchmarks/bench_forward_cost.py`), which no draft length can win
back.

`forward_extend` (an AROUND hook on `TorchNativeAttnBackend.forward_extend`, listed in
`hooks.HOOK_TARGETS`) computes the same attention with the n real queries only: causal layers
mask key j for query t unless j <= prefix + t (the offset causal mask), the bidirectional view
(`model.mode_selected`, a dLLM draft block) attends to every key of its sequence. Same keys,
same values, same softmax; only which rows are computed changes. It applies to our model's
layers only (every other model, cross-attention and sliding windows reach SGLang's code
unchanged), and writes the KV cache as SGLang does before attending.

`forward_decode` (an AROUND hook on `TorchNativeAttnBackend.forward_decode`, same layers, CPU
tensors only) is SGLang's decode attention, one query per request over its whole sequence, with
its keys and values gathered by `index_select` instead of advanced indexing (`k_cache[slots]`).
Both copy the same rows (the attention is bitwise SGLang's), but on CPU advanced indexing copies
element by element: 2000 slots of [2, 32] floats cost 55 us against 8.5 us, and one layer's
decode attention of 16 requests over 400-800 cached tokens (scattered slots) 3.1 ms against
1.5 ms (`_gather`; 2-core CPU, torch 2.14).
"""

from __future__ import annotations

import torch
from torch.nn.functional import scaled_dot_product_attention


def _ours(layer) -> bool:
    from .model import _BidirectionalView, is_mode_selected

    return is_mode_selected(layer) or isinstance(layer, _BidirectionalView)


def _gather(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """cache[slots] ([n, heads, dim]), as whole-row copies (see the module docstring)."""
    return cache.index_select(0, slots)


def _offset_causal_masks(prefix_lens: list[int], extend_lens: list[int], dtype, device) -> dict[int, torch.Tensor]:
    """{n: [n, T] additive mask} for every extend width n > 1, T the longest sequence of that
    width: zeros, and -inf where key column T - n + j is later than query t (j > t). A request of
    `total` keys takes the view `[:, -total:]`, its offset causal mask (query t, at position
    prefix + t, sees keys 0 .. prefix + t). One mask per width for all requests and an additive
    float mask rather than a bool one: SDPA converts a bool mask to this form on every call; that
    and building the mask per request cost a fifth to a third of a request's attention (16
    requests of 32 queries over ~200 keys, CPU); the results are bitwise the same (tested)."""
    longest: dict[int, int] = {}
    for prefix, n in zip(prefix_lens, extend_lens):
        if n > 1:
            longest[n] = max(longest.get(n, 0), prefix + n)
    masks = {}
    for n, total in longest.items():
        mask = torch.zeros((n, total), dtype=dtype, device=device)
        mask[:, total - n:] = torch.full((n, n), float("-inf"), dtype=dtype, device=device).triu(1)
        masks[n] = mask
    return masks


def extend_attention(q, k_cache, v_cache, req_to_token, req_pool_indices, prefix_lens: list[int],
                     extend_lens: list[int], *, scaling, enable_gqa: bool, causal: bool) -> torch.Tensor:
    """Attention of the new tokens of each request over its cached prefix and themselves.

    q: [tokens, heads, dim] (requests back to back); returns [tokens, heads, v_dim]."""
    out = q.new_empty((q.shape[0], q.shape[1], v_cache.shape[-1]))
    masks = _offset_causal_masks(prefix_lens, extend_lens, q.dtype, q.device) if causal else {}
    start = 0
    for i, (prefix, n) in enumerate(zip(prefix_lens, extend_lens)):
        if n == 0:
            continue
        total = prefix + n
        slots = req_to_token[req_pool_indices[i], :total]
        query = q[start:start + n].movedim(0, 1).unsqueeze(0)  # [1, heads, n, dim]
        key = _gather(k_cache, slots).movedim(0, 1).unsqueeze(0)
        value = _gather(v_cache, slots).movedim(0, 1).unsqueeze(0)
        if key.dtype != query.dtype:
            key, value = key.to(query.dtype), value.to(query.dtype)
        mask = masks[n][:, -total:] if n in masks else None
        attn = scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=enable_gqa)
        out[start:start + n] = attn.squeeze(0).movedim(1, 0)
        start += n
    return out


def decode_attention(q, k_cache, v_cache, req_to_token, req_pool_indices: list[int], seq_lens: list[int], *,
                     scaling, enable_gqa: bool) -> torch.Tensor:
    """Attention of each request's one new token over its whole sequence (SGLang's
    `_run_sdpa_forward_decode`: the same operations on the same operands).

    q: [requests, heads, dim] (the new token's KV already written); returns [requests, heads, v_dim]."""
    out = q.new_empty((q.shape[0], q.shape[1], v_cache.shape[-1]))
    queries = q.movedim(0, 1)  # [heads, requests, dim]
    for i, (row, n) in enumerate(zip(req_pool_indices, seq_lens)):
        slots = req_to_token[row, :n]
        key = _gather(k_cache, slots).movedim(0, 1)
        value = _gather(v_cache, slots).movedim(0, 1)
        if key.dtype != q.dtype:
            key, value = key.to(q.dtype), value.to(q.dtype)
        attn = scaled_dot_product_attention(queries[:, i:i + 1].unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0),
                                            scale=scaling, enable_gqa=enable_gqa)
        out[i] = attn[0, :, 0]
    return out


def _sglang_handles(layer) -> bool:
    """Layers these hooks leave to SGLang: every other model's, cross-attention, sliding windows,
    value heads narrower or wider than the query's."""
    sliding = getattr(layer, "sliding_window_size", None)
    return (not _ours(layer) or layer.is_cross_attention or (sliding is not None and sliding > -1)
            or layer.qk_head_dim != layer.v_head_dim)


def _write_kv(backend, k, v, layer, forward_batch, save_kv_cache: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Write the new tokens' K/V as SGLang's backend does before attending; return the layer's
    key and value buffers."""
    from sglang.srt.mem_cache.memory_pool import KVWriteLoc

    pool = backend.token_to_kv_pool
    if save_kv_cache and k is not None and v is not None:
        pool.set_kv_buffer(layer, KVWriteLoc(forward_batch.out_cache_loc, backend.swa_out_cache_loc), k, v)
    return pool.get_key_buffer(layer.layer_id), pool.get_value_buffer(layer.layer_id)


def forward_decode(original, self, q, k, v, layer, forward_batch, save_kv_cache=True):
    # CPU only: the gather cost is a CPU measurement; elsewhere SGLang's loop runs as it is.
    if (q.device.type != "cpu" or _sglang_handles(layer) or forward_batch.seq_lens_cpu is None
            or forward_batch.encoder_lens is not None):
        return original(self, q, k, v, layer, forward_batch, save_kv_cache)
    out = decode_attention(
        q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim),
        *_write_kv(self, k, v, layer, forward_batch, save_kv_cache),
        self.req_to_token_pool.req_to_token,
        forward_batch.req_pool_indices.tolist(),  # (SGLang's loop reads a scalar per request instead)
        forward_batch.seq_lens_cpu.tolist(),
        scaling=layer.scaling,
        enable_gqa=layer.tp_q_head_num != layer.tp_k_head_num,
    )
    return out.view(out.shape[0], -1)


def forward_extend(original, self, q, k, v, layer, forward_batch, save_kv_cache=True):
    if _sglang_handles(layer) or forward_batch.extend_seq_lens_cpu is None:
        return original(self, q, k, v, layer, forward_batch, save_kv_cache)
    from sglang.srt.layers.radix_attention import AttentionType

    out = extend_attention(
        q.view(-1, layer.tp_q_head_num, layer.qk_head_dim),
        *_write_kv(self, k, v, layer, forward_batch, save_kv_cache),
        self.req_to_token_pool.req_to_token,
        forward_batch.req_pool_indices,
        [int(p) for p in forward_batch.extend_prefix_lens_cpu],
        [int(n) for n in forward_batch.extend_seq_lens_cpu],
        scaling=layer.scaling,
        enable_gqa=layer.tp_q_head_num != layer.tp_k_head_num,
        causal=layer.attn_type != AttentionType.ENCODER_ONLY,
    )
    return out.view(q.shape[0], -1)
