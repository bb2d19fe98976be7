"""W8A8 FP8 GEMM for small M (Triton): per-token activation quantization, then a split-K GEMM.

    y = (q(x) * s_x) @ (W_q * s_w)^T (+ bias)

the scheme of `quantize/fp8.py` (its `fp8_linear` is the reference this file must match):
float8 e4m3 weights `W_q` [N, K] with one float32 scale per output channel `s_w` [N] (the
compressed-tensors checkpoint layout, used as stored: no repacking), activations quantized per
token at every call (`s_x[m] = max_k |x[m, k]| / 448`), float32 accumulation, the product rescaled
by `s_x[m] * s_w[n]`, bias added in float32, output in x's dtype.

Two launches:
1. `_quantize_rows_kernel`: one program per row, the row's amax, its scale, and the float8 values,
   rounded to nearest-even exactly as `torch.Tensor.to(float8_e4m3fn)` rounds (the rounding is
   done in float32 arithmetic, then converted: bit-identical to the reference's quantization on
   every device, and independent of how a converter rounds).
2. `_fp8_gemm_kernel`: grid (N tiles, M tiles, K splits). A Fast-dVLM forward at batch 1 is one
   32-token block, so every linear is a GEMM with M = 32 (1 for an AR step): reading W dominates
   and a 32-row GEMM has few output tiles; splitting K lets a narrow layer (N = 2048, K = 11008,
   the MLP's down projection) still fill every SM. Split partials go to a float32 workspace and
   `_splitk_epilogue_kernel` sums them in split order (deterministic, no atomics), then applies
   the scales and the bias; with one split the GEMM applies them itself.

Quantizing separately costs one small launch (x is M x K: 128 KB at M = 32, K = 2048, against 4-22
MB of weights); fusing it into the GEMM's prologue would make every program re-read the row to
find its amax. Which is faster is for the GPU benchmark (`benchmarks/kernels.py`) to show.

Configs per (M bucket, N, K) come from a committed table (`fp8_gemm_configs.json`, written by
`python benchmarks/kernels.py --tune-gemm` on a GPU); shapes not in it get `heuristic_config`.
Nothing is autotuned while serving.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch
import triton
import triton.language as tl

FP8_MAX = 448.0
MIN_SCALE = 1e-12  # quantize/fp8.py: a row of zeros gets this scale
CONFIG_TABLE = Path(__file__).with_name("fp8_gemm_configs.json")
M_BUCKETS = (1, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class GemmConfig:
    block_m: int = 32
    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


@triton.jit
def _round_to_e4m3(v):
    """float32 `v` (|v| <= 448) rounded to the nearest float8 e4m3 value, ties to even, as float32."""
    bits = v.to(tl.int32, bitcast=True)
    exponent = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)  # e4m3: 3 mantissa bits, subnormals below 2^-6
    step = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 2^(exponent - 3)
    t = tl.abs(v) / step  # exact: a power of two
    t = (t + 12582912.0) - 12582912.0  # 1.5 * 2^23: float32 addition rounds t < 2^22 to an integer, ties to even
    return tl.where(bits < 0, -t * step, t * step)  # the sign kept, -0.0 included


@triton.jit
def _quantize_rows_kernel(X, Xq, Scale, K, stride_xm, stride_qm, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    amax = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + row * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, 0) / FP8_MAX, MIN_SCALE)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + row * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
        q = _round_to_e4m3(tl.minimum(tl.maximum(x / scale, -FP8_MAX), FP8_MAX))
        tl.store(Xq + row * stride_qm + k, q.to(Xq.dtype.element_ty), mask=k < K)
    tl.store(Scale + row, scale)


@triton.jit
def _fp8_gemm_kernel(
    A, B, C, Part, ScaleA, ScaleB, Bias, M, N, K,
    stride_am, stride_bn, stride_bk, stride_cm, stride_pk, stride_pm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < M, rn < N
    per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = pid_k * per_split
    k_hi = tl.minimum(K, k_lo + per_split)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < k_hi
        a = tl.load(A + rm[:, None].to(tl.int64) * stride_am + rk[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        b = tl.load(B + rn[None, :].to(tl.int64) * stride_bn + rk[:, None] * stride_bk,
                    mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(a, b, acc)
    mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        sa = tl.load(ScaleA + rm, mask=m_ok, other=0.0)
        sb = tl.load(ScaleB + rn, mask=n_ok, other=0.0)
        y = acc * sa[:, None] * sb[None, :]
        if HAS_BIAS:
            y = y + tl.load(Bias + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(C + rm[:, None].to(tl.int64) * stride_cm + rn[None, :], y.to(C.dtype.element_ty), mask=mask)
    else:
        tl.store(Part + pid_k * stride_pk + rm[:, None].to(tl.int64) * stride_pm + rn[None, :], acc, mask=mask)


@triton.jit
def _splitk_epilogue_kernel(C, Part, ScaleA, ScaleB, Bias, M, N, stride_cm, stride_pk, stride_pm,
                            SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    acc = tl.zeros([BLOCK_N], tl.float32)
    for s in range(SPLIT_K):  # in split order: the same bits every time
        acc += tl.load(Part + s * stride_pk + row * stride_pm + rn, mask=n_ok, other=0.0)
    y = acc * tl.load(ScaleA + row) * tl.load(ScaleB + rn, mask=n_ok, other=0.0)
    if HAS_BIAS:
        y = y + tl.load(Bias + rn, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(C + row * stride_cm + rn, y.to(C.dtype.element_ty), mask=n_ok)


def supported(device) -> bool:
    """float8 tensor-core dots: CUDA compute capability 8.9+ (Ada, Hopper, Blackwell); on a CPU the
    interpreter runs it (tests)."""
    device = torch.device(device)
    return device.type != "cuda" or _capability(device.index) >= (8, 9)


@lru_cache(maxsize=16)
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def m_bucket(m: int) -> int:
    for b in M_BUCKETS:
        if m <= b:
            return b
    return M_BUCKETS[-1]


def heuristic_config(m: int, n: int, k: int, num_sms: int = 132) -> GemmConfig:
    """Enough programs to cover ~2 waves of the SMs: one M tile up to 64 rows, 64-wide N tiles,
    and K split while the N tiles alone are too few (each split keeps >= 4 K steps)."""
    block_m = min(64, max(16, 1 << math.ceil(math.log2(max(1, m)))))
    block_n, block_k = 64, 128
    tiles = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    split = max(1, min(2 * num_sms // max(1, tiles), k // (4 * block_k), 16))
    return GemmConfig(block_m=block_m, block_n=block_n, block_k=block_k, split_k=split)


@lru_cache(maxsize=1)
def _table() -> dict:
    if not CONFIG_TABLE.is_file():
        return {}
    return json.loads(CONFIG_TABLE.read_text()).get("configs", {})


def config_for(m: int, n: int, k: int, device) -> GemmConfig:
    """The committed config of (M bucket, N, K) for this GPU, else the heuristic."""
    device = torch.device(device)
    return _config_for(m, n, k, device.type, device.index)


@lru_cache(maxsize=4096)  # called per linear per forward: no driver query after the first
def _config_for(m: int, n: int, k: int, device_type: str, index: int | None) -> GemmConfig:
    if device_type != "cuda":
        return heuristic_config(m, n, k, num_sms=4)
    name = torch.cuda.get_device_name(index)
    entry = _table().get(name, {}).get(f"{m_bucket(m)}x{n}x{k}")
    if entry is not None:
        return GemmConfig(**entry)
    return heuristic_config(m, n, k, torch.cuda.get_device_properties(index).multi_processor_count)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (float8 e4m3 [M, K], float32 scale [M]); bit-identical to `quantize_per_token`."""
    m, k = x.shape
    xq = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    if m:
        _quantize_rows_kernel[(m,)](x, xq, scale, k, x.stride(0), xq.stride(0),
                                    BLOCK_K=min(1024, triton.next_power_of_2(max(16, k))))
    return xq, scale


def fp8_gemm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
             *, out_dtype: torch.dtype | None = None, config: GemmConfig | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """`fp8_linear` (quantize/fp8.py) as two Triton launches. x [..., K]; weight float8 [N, K] (any
    strides: SGLang keeps it as a transposed view); weight_scale [N] or [N, 1]; bias [N]."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, k = x2.shape
    n = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"x has {k} features, the weight {weight.shape[1]}")
    out_dtype = out_dtype or x.dtype
    if out is None:
        out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m == 0:
        return out.reshape(*shape[:-1], n)
    xq, sx = quantize_rows(x2)
    sw = weight_scale.reshape(-1).float()
    cfg = config or config_for(m, n, k, x.device)
    split = max(1, min(cfg.split_k, triton.cdiv(k, cfg.block_k)))
    part = out if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    has_bias = bias is not None
    bias_arg = bias if has_bias else sw
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m), split)
    _fp8_gemm_kernel[grid](
        xq, weight, out, part, sx, sw, bias_arg, m, n, k,
        xq.stride(0), weight.stride(0), weight.stride(1), out.stride(0),
        part.stride(0) if split > 1 else 0, part.stride(1) if split > 1 else 0,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=split, HAS_BIAS=has_bias,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split > 1:
        block_n = min(1024, triton.next_power_of_2(n))
        _splitk_epilogue_kernel[(m, triton.cdiv(n, block_n))](
            out, part, sx, sw, bias_arg, m, n, out.stride(0), part.stride(0), part.stride(1),
            SPLIT_K=split, BLOCK_N=block_n, HAS_BIAS=has_bias)
    return out.reshape(*shape[:-1], n)


def fp8_gemm_reference(x, weight, weight_scale, bias=None, *, out_dtype=None) -> torch.Tensor:
    """The computation this kernel must match: `quantize/fp8.py:fp8_linear` (float32 emulation)."""
    from fast_dvlm_sglang.quantize.fp8 import fp8_linear

    return fp8_linear(x, weight, weight_scale.reshape(-1, 1), bias, out_dtype=out_dtype, use_scaled_mm=False)


def write_config_table(device_name: str, configs: dict[str, GemmConfig], command: str) -> None:
    """Record tuned configs for one GPU in the committed table (kept for other GPUs)."""
    data = json.loads(CONFIG_TABLE.read_text()) if CONFIG_TABLE.is_file() else {}
    data["command"] = command
    data.setdefault("configs", {})[device_name] = {key: asdict(c) for key, c in sorted(configs.items())}
    tmp = CONFIG_TABLE.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    tmp.replace(CONFIG_TABLE)
    _table.cache_clear()
    _config_for.cache_clear()
