"""Block-diffusion attention over SGLang's paged KV cache (Triton): kernel, launcher, reference.

One launch serves every attention a Fast-dVLM forward needs: the new tokens of a batch of
requests (1 for an AR step, 32 for a block, hundreds for a prefill) attend over each request's
whole cached context, read where SGLang keeps it, either causally (prefill, AR step, speculative
verify) or block-bidirectionally (speculative draft, MDM steps: the new tokens see all context and
each other). The new tokens' K/V are already in the pool (the caller ran SGLang's `set_kv_buffer`),
so key j of request b lives in slot

    page_size == 1:  req_to_token[req_pool_indices[b], j]
    page_size == P:  req_to_token[req_pool_indices[b], (j // P) * P] + j % P

(SGLang's `req_to_token` holds token slots for every page size; a page's slots are contiguous, so
one table read per page would do; reading the page's first slot keeps one code path). Query t of
request b sits at position `prefix + t`, `prefix = seq_lens[b] - q_lens[b]`; causally it sees keys
`j <= prefix + t`, block-bidirectionally keys `j < seq_lens[b]`. The mask is never materialised:
it is two integer compares per tile. `kernels/README.md` draws the layout.

Tiles: the query heads that share a KV head are packed into one tile with the request's tokens
(rows = BLOCK_T tokens x GROUP_PAD heads), so a 32-token block of the 3B (16 Q / 2 KV heads)
fills a 64-row MMA while each K/V tile is read once per group. Online softmax in base 2.

Split-KV (flash-decoding): a request with few new tokens (<= `max_split_query`) and a long context
is cut into up to `max_splits` contiguous key ranges handled by separate programs, whose partial
(output, log-sum-exp) rows a second kernel merges in split order. The split count and ranges depend
only on the request's own `seq_len`, and the tile shape only on the head ratio and on whether the
launch is single-token, so a row's output never depends on which other requests share its launch,
and the same inputs give the same bits every time (no atomics).

CUDA graphs: the grid depends only on (batch size, max new tokens per request, KV heads,
`max_splits`), all fixed per captured shape; lengths and tables are read from device tensors, so a
replay with new contents computes the current attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class BlockAttentionConfig:
    """Launch shape. Defaults are for a GPU; tests shrink the split sizes to exercise splitting."""

    block_m: int = 64  # tile rows (tokens x packed query heads) for multi-token launches
    decode_block_m: int = 16  # tile rows when every request brings one token (AR decode)
    block_n: int = 64  # keys per inner step
    max_splits: int = 16  # split-KV programs per (request, KV head, tile); 1 disables splitting
    min_split_keys: int = 256  # a split covers at least this many keys
    max_split_query: int = 64  # requests with more new tokens (prefills) are never split
    num_warps: int = 4
    num_stages: int = 2


DEFAULT_CONFIG = BlockAttentionConfig()
# Triton's interpreter runs programs one after another: split-KV only adds programs there.
INTERPRETER_CONFIG = BlockAttentionConfig(max_splits=1)


def default_config(device) -> BlockAttentionConfig:
    return DEFAULT_CONFIG if torch.device(device).type == "cuda" else INTERPRETER_CONFIG


@triton.jit
def _block_attention_kernel(
    Q, K, V, Out, PartO, PartLse,
    ReqToToken, ReqPoolIdx, QStart, QLen, SeqLen, SplitRow,
    sm_scale_log2,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_r2t, stride_pr, stride_ph, stride_ps, stride_lr, stride_lh,
    tiles_per_req,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PAGE_SIZE: tl.constexpr, CAUSAL: tl.constexpr, MAX_SPLITS: tl.constexpr,
    MIN_SPLIT_KEYS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    b = pid // tiles_per_req
    t0 = (pid % tiles_per_req) * BLOCK_T
    q_len = tl.load(QLen + b)
    seq_len = tl.load(SeqLen + b)
    q_start = tl.load(QStart + b)
    req = tl.load(ReqPoolIdx + b).to(tl.int64)
    split_row = tl.load(SplitRow + b)  # -1: this request is not split
    prefix = seq_len - q_len

    if MAX_SPLITS > 1:
        num_splits = tl.where(split_row >= 0, tl.minimum(tl.cdiv(seq_len, MIN_SPLIT_KEYS), MAX_SPLITS), 1)
    else:
        num_splits = 1
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    kv_lo = split * chunk
    kv_hi = tl.minimum(seq_len, kv_lo + chunk)
    if CAUSAL:
        kv_hi = tl.minimum(kv_hi, prefix + t0 + BLOCK_T)  # the tile's last row sees no further
    active = (t0 < q_len) & (split < num_splits)
    kv_hi = tl.where(active, kv_hi, kv_lo)  # an inactive program runs no key step

    rows = tl.arange(0, BLOCK_T * GROUP_PAD)
    t = t0 + rows // GROUP_PAD
    g = rows % GROUP_PAD
    row_ok = (t < q_len) & (g < GROUP)
    head = kvh * GROUP + g
    q_pos = prefix + t
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    token = (q_start + t).to(tl.int64)

    q = tl.load(Q + token[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
    m_i = tl.full([BLOCK_T * GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_T * GROUP_PAD], tl.float32)
    acc = tl.zeros([BLOCK_T * GROUP_PAD, BLOCK_DV], tl.float32)
    table = ReqToToken + req * stride_r2t

    for start in range(kv_lo, kv_hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        j_ok = j < kv_hi
        if PAGE_SIZE == 1:
            slot = tl.load(table + j, mask=j_ok, other=0)
        else:
            slot = tl.load(table + (j // PAGE_SIZE) * PAGE_SIZE, mask=j_ok, other=0) + j % PAGE_SIZE
        slot = slot.to(tl.int64)
        k = tl.load(K + slot[None, :] * stride_kt + kvh * stride_kh + d[:, None],
                    mask=j_ok[None, :] & (d[:, None] < D), other=0.0)
        s = tl.dot(q, k.to(q.dtype), input_precision=DOT_PRECISION) * sm_scale_log2
        visible = row_ok[:, None] & j_ok[None, :]
        if CAUSAL:
            visible = visible & (j[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that sees nothing yet
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + slot[:, None] * stride_vt + kvh * stride_vh + dv[None, :],
                    mask=j_ok[:, None] & (dv[None, :] < DV), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]
    dv_ok = dv[None, :] < DV
    if MAX_SPLITS > 1:
        is_split = split_row >= 0
        prow = (split_row + t).to(tl.int64)
        part = row_ok & is_split & (split < num_splits)
        tl.store(PartO + prow[:, None] * stride_pr + head[:, None] * stride_ph + split * stride_ps + dv[None, :],
                 o, mask=part[:, None] & dv_ok)
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(PartLse + prow * stride_lr + head * stride_lh + split, lse, mask=part)
        direct = row_ok & (split_row < 0) & (split == 0)
    else:
        direct = row_ok
    tl.store(Out + token[:, None] * stride_ot + head[:, None] * stride_oh + dv[None, :],
             o.to(Out.dtype.element_ty), mask=direct[:, None] & dv_ok)


@triton.jit
def _merge_splits_kernel(
    Out, PartO, PartLse, QStart, QLen, SeqLen, SplitRow,
    stride_ot, stride_oh, stride_pr, stride_ph, stride_ps, stride_lr, stride_lh,
    DV: tl.constexpr, BLOCK_DV: tl.constexpr, MAX_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
    MIN_SPLIT_KEYS: tl.constexpr,
):
    b = tl.program_id(0)
    t = tl.program_id(1)
    h = tl.program_id(2)
    split_row = tl.load(SplitRow + b)
    q_len = tl.load(QLen + b)
    seq_len = tl.load(SeqLen + b)
    ok = (split_row >= 0) & (t < q_len)
    num_splits = tl.minimum(tl.cdiv(seq_len, MIN_SPLIT_KEYS), MAX_SPLITS)
    s = tl.arange(0, BLOCK_S)
    s_ok = (s < num_splits) & ok
    row = tl.where(ok, split_row + t, 0).to(tl.int64)
    dv = tl.arange(0, BLOCK_DV)
    lse = tl.load(PartLse + row * stride_lr + h * stride_lh + s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m_use)
    part = tl.load(PartO + row * stride_pr + h * stride_ph + s[:, None] * stride_ps + dv[None, :],
                   mask=s_ok[:, None] & (dv[None, :] < DV), other=0.0)
    total = tl.sum(w, 0)
    o = tl.sum(w[:, None] * part, 0) / tl.where(total > 0, total, 1.0)
    token = (tl.load(QStart + b) + t).to(tl.int64)
    tl.store(Out + token * stride_ot + h * stride_oh + dv, o.to(Out.dtype.element_ty), mask=ok & (dv < DV))


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def split_rows(q_lens: torch.Tensor, seq_lens: torch.Tensor, config: BlockAttentionConfig) -> torch.Tensor:
    """Per request: its first row in the split-partial buffers, or -1 when it is not split.
    Device ops only (no host sync; recordable in a CUDA graph)."""
    if config.max_splits <= 1:
        return torch.full_like(q_lens, -1, dtype=torch.int32)
    is_split = (q_lens <= config.max_split_query) & (seq_lens > config.min_split_keys) & (q_lens > 0)
    rows = torch.where(is_split, q_lens, torch.zeros_like(q_lens))
    first = torch.cumsum(rows, 0) - rows
    return torch.where(is_split, first, torch.full_like(first, -1)).to(torch.int32)


def partial_rows_bound(num_tokens: int, batch: int, config: BlockAttentionConfig) -> int:
    """Rows the split-partial buffers need for a launch of `num_tokens` over `batch` requests."""
    return max(1, min(num_tokens, batch * config.max_split_query)) if config.max_splits > 1 else 1


def allocate_partials(rows: int, num_q_heads: int, v_head_dim: int, config: BlockAttentionConfig,
                      device) -> tuple[torch.Tensor, torch.Tensor]:
    """Scratch for split-KV partial outputs and log-sum-exps (float32)."""
    splits = max(1, config.max_splits)
    return (torch.empty((rows, num_q_heads, splits, v_head_dim), dtype=torch.float32, device=device),
            torch.empty((rows, num_q_heads, splits), dtype=torch.float32, device=device))


def block_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    q_start: torch.Tensor,
    q_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    max_q_len: int,
    causal: bool,
    sm_scale: float | None = None,
    page_size: int = 1,
    out: torch.Tensor | None = None,
    config: BlockAttentionConfig = DEFAULT_CONFIG,
    partials: tuple[torch.Tensor, torch.Tensor] | None = None,
    split_row: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of each request's new tokens over its cached context (see the module docstring).

    q: [tokens, q_heads, D], requests back to back from `q_start[b]`, `q_lens[b]` rows each;
    k_cache / v_cache: [slots, kv_heads, D / Dv] (one layer of SGLang's token-to-KV pool);
    req_to_token: [rows, max_context] token slots; req_pool_indices, q_start, q_lens, seq_lens: [B]
    (seq_lens counts the context and the new tokens). `max_q_len` (host int) bounds q_lens and
    fixes the grid. Returns out: [tokens, q_heads, Dv] in q's dtype; rows of no request untouched.
    """
    tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, v_head_dim = k_cache.shape[1], v_cache.shape[-1]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q, k_cache and v_cache need a contiguous last dimension")
    if out is None:
        out = q.new_empty((tokens, num_q_heads, v_head_dim))
    batch = q_lens.shape[0]
    if batch == 0 or tokens == 0 or max_q_len <= 0:
        return out
    group = num_q_heads // num_kv_heads
    group_pad = _pow2(group)
    block_m = max(config.decode_block_m if max_q_len == 1 else config.block_m, group_pad, 16)
    block_t = block_m // group_pad
    tiles = triton.cdiv(max_q_len, block_t)
    splits = max(1, config.max_splits)
    if split_row is None:
        split_row = split_rows(q_lens, seq_lens, config)
    if partials is None:
        partials = allocate_partials(partial_rows_bound(tokens, batch, config), num_q_heads, v_head_dim,
                                     config, q.device)
    part_o, part_lse = partials
    scale = sm_scale if sm_scale is not None else head_dim ** -0.5
    precision = "ieee" if q.dtype == torch.float32 else None  # float32 stays float32 (no TF32)
    _block_attention_kernel[(batch * tiles, num_kv_heads, splits)](
        q, k_cache, v_cache, out, part_o, part_lse,
        req_to_token, req_pool_indices, q_start, q_lens, seq_lens, split_row,
        scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        out.stride(0), out.stride(1),
        req_to_token.stride(0), part_o.stride(0), part_o.stride(1), part_o.stride(2),
        part_lse.stride(0), part_lse.stride(1),
        tiles,
        GROUP=group, GROUP_PAD=group_pad, BLOCK_T=block_t, BLOCK_N=config.block_n,
        D=head_dim, DV=v_head_dim, BLOCK_D=max(16, _pow2(head_dim)), BLOCK_DV=max(16, _pow2(v_head_dim)),
        PAGE_SIZE=page_size, CAUSAL=causal, MAX_SPLITS=splits, MIN_SPLIT_KEYS=config.min_split_keys,
        DOT_PRECISION=precision, num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if splits > 1:
        _merge_splits_kernel[(batch, min(max_q_len, config.max_split_query), num_q_heads)](
            out, part_o, part_lse, q_start, q_lens, seq_lens, split_row,
            out.stride(0), out.stride(1), part_o.stride(0), part_o.stride(1), part_o.stride(2),
            part_lse.stride(0), part_lse.stride(1),
            DV=v_head_dim, BLOCK_DV=max(16, _pow2(v_head_dim)), MAX_SPLITS=splits, BLOCK_S=_pow2(splits),
            MIN_SPLIT_KEYS=config.min_split_keys, num_warps=config.num_warps,
        )
    return out


def dense_block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                          config: BlockAttentionConfig | None = None) -> torch.Tensor:
    """The kernel over a dense cache (the reference model's): q [B, Hq, T, D] (the new tokens),
    k, v [B, Hkv, S, D] (context + new tokens), contiguous or the first S keys of a longer
    [B, Hkv, S_max, D] buffer. Returns [B * T, Hq, D].

    No copy of K/V: the dense tensor is read as a pool whose slot `b * Hkv * S_max + j` is key j
    of sequence b (slot stride D, head stride S_max * D), through an identity table."""
    batch, num_q_heads, new, head_dim = q.shape
    num_kv_heads, total = k.shape[1], k.shape[2]
    k, v = _keys_in_rows(k), _keys_in_rows(v)
    span = k.stride(1) // k.shape[-1]  # keys between two heads' rows in memory (S_max >= S)
    if v.stride(1) // v.shape[-1] != span:
        k, v, span = k.contiguous(), v.contiguous(), total
    slots = batch * num_kv_heads * span - (num_kv_heads - 1) * span
    k_pool = k.as_strided((slots, num_kv_heads, head_dim), (head_dim, span * head_dim, 1))
    v_pool = v.as_strided((slots, num_kv_heads, v.shape[-1]), (v.shape[-1], span * v.shape[-1], 1))
    table = (torch.arange(batch, device=q.device, dtype=torch.int32)[:, None] * (num_kv_heads * span)
             + torch.arange(total, device=q.device, dtype=torch.int32)[None, :])
    lens = torch.full((batch,), new, dtype=torch.int32, device=q.device)
    return block_attention(
        q.transpose(1, 2).reshape(batch * new, num_q_heads, head_dim), k_pool, v_pool, table,
        torch.arange(batch, device=q.device, dtype=torch.int32), torch.arange(0, batch * new, new, device=q.device,
                                                                               dtype=torch.int32),
        lens, torch.full((batch,), total, dtype=torch.int32, device=q.device), max_q_len=new, causal=causal,
        config=config or default_config(q.device))


def _keys_in_rows(x: torch.Tensor) -> torch.Tensor:
    """`x` [B, H, S, D] if its keys are rows of one buffer (key stride D, unit element stride,
    batch stride H x head stride), else a contiguous copy."""
    b, h, s, d = x.shape
    if x.stride(3) == 1 and x.stride(2) == d and x.stride(1) % d == 0 and x.stride(1) >= s * d \
            and (b == 1 or x.stride(0) == h * x.stride(1)):
        return x
    return x.contiguous()


def key_slots(req_to_token: torch.Tensor, row: int, length: int, page_size: int = 1) -> torch.Tensor:
    """Slots of keys 0..length-1 of one request (the kernel's index math, in PyTorch)."""
    j = torch.arange(length, device=req_to_token.device)
    if page_size == 1:
        return req_to_token[row, j].long()
    return req_to_token[row, (j // page_size) * page_size].long() + j % page_size


def block_attention_reference(q, k_cache, v_cache, req_to_token, req_pool_indices, q_start, q_lens, seq_lens,
                              *, causal: bool, sm_scale: float | None = None, page_size: int = 1) -> torch.Tensor:
    """The same attention in float64 with an explicit [new, context] mask, one request at a time."""
    tokens, num_q_heads, head_dim = q.shape
    group = num_q_heads // k_cache.shape[1]
    scale = sm_scale if sm_scale is not None else head_dim ** -0.5
    out = torch.zeros((tokens, num_q_heads, v_cache.shape[-1]), dtype=torch.float64, device=q.device)
    for b in range(q_lens.shape[0]):
        n, total, start = int(q_lens[b]), int(seq_lens[b]), int(q_start[b])
        if n == 0:
            continue
        slots = key_slots(req_to_token, int(req_pool_indices[b]), total, page_size)
        key = k_cache[slots].double().repeat_interleave(group, dim=1)  # [total, q_heads, D]
        value = v_cache[slots].double().repeat_interleave(group, dim=1)
        query = q[start:start + n].double()
        scores = torch.einsum("thd,jhd->htj", query, key) * scale
        if causal:
            visible = torch.arange(total)[None, :] <= (total - n) + torch.arange(n)[:, None]
            scores = scores.masked_fill(~visible.to(q.device), float("-inf"))
        out[start:start + n] = torch.einsum("htj,jhd->thd", scores.softmax(-1), value)
    return out
