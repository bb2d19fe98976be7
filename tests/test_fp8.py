"""The W8A8 FP8 arithmetic (`quantize/fp8.py`) against float math, with error bounds from the
float8 e4m3 format itself: 3 mantissa bits (rounding to nearest: relative error <= 2^-4 for normal
values) and subnormals down to 2^-9 (absolute error <= 2^-10 below 2^-6), in units of the scale."""

from __future__ import annotations

import pytest
import torch

from fast_dvlm_sglang.quantize.fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    FP8Linear,
    dequantize,
    fp8_linear,
    quantize_per_channel,
    quantize_per_token,
)

REL = 2.0 ** -4  # half an ulp of a 3-bit mantissa
ABS = 2.0 ** -10  # half the smallest subnormal, in units of the scale

SHAPES = [(1, 1), (3, 7), (17, 130), (64, 33), (5, 256)]


def _weights(shape, seed, kind):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    if kind == "outliers":
        w[:, 0] *= 300.0  # one huge input channel (what SmoothQuant moves into the weights)
    elif kind == "tiny":
        w *= 1e-6
    elif kind == "zero_row":
        w[0] = 0.0
    return w


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["normal", "outliers", "tiny", "zero_row"])
@pytest.mark.parametrize("seed", [0, 1])
def test_per_channel_error_is_within_the_format(shape, kind, seed):
    w = _weights(shape, seed, kind)
    q, s = quantize_per_channel(w)
    assert q.dtype == FP8_DTYPE and s.shape == (shape[0], 1) and s.dtype == torch.float32
    err = (dequantize(q, s) - w).abs()
    assert torch.all(err <= REL * w.abs() + ABS * s + 1e-30)
    # each row's largest magnitude is the format's largest value: the scale uses the full range
    nonzero = w.abs().amax(dim=1) > 0
    assert torch.all(q.float().abs().amax(dim=1)[nonzero] == FP8_MAX)


@pytest.mark.parametrize("shape", [(4,), (2, 3, 9), (1, 32, 128), (0, 16)])
def test_per_token_scales_each_token(shape):
    x = torch.randn(*shape) * torch.logspace(-3, 3, shape[-1])
    q, s = quantize_per_token(x)
    assert s.shape == (*shape[:-1], 1)
    assert torch.all((dequantize(q, s) - x).abs() <= REL * x.abs() + ABS * s)


def _bound(x, w):
    """|y - y_float| for per-token x and per-channel w quantization, summed over k."""
    _, sx = quantize_per_token(x)
    _, sw = quantize_per_channel(w)
    ax, aw = ABS * sx, ABS * sw.reshape(1, -1)
    xa, wa = x.abs(), w.abs().t()
    # (x + ex)(w + ew) - xw with |ex| <= REL|x| + ax, |ew| <= REL|w| + aw, summed over k
    return ((2 * REL + REL * REL) * (xa @ wa) + (1 + REL) * (ax * wa.sum(0, keepdim=True) + xa.sum(-1, keepdim=True) * aw)
            + ax * aw * x.shape[-1])


@pytest.mark.parametrize("m,k,n", [(1, 16, 8), (32, 128, 96), (7, 33, 5), (64, 256, 512)])
@pytest.mark.parametrize("scaled_mm", [False, True])
def test_fp8_linear_error_bound(m, k, n, scaled_mm):
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    x = torch.randn(m, k, generator=g) * 3
    w = torch.randn(n, k, generator=g) / k ** 0.5
    q, s = quantize_per_channel(w)
    y = fp8_linear(x, q, s, use_scaled_mm=scaled_mm)
    ref = x @ w.t()
    assert y.shape == (m, n) and y.dtype == x.dtype
    assert torch.all((y - ref).abs() <= _bound(x, w) * 1.001 + 1e-5)


@pytest.mark.parametrize("m,k,n", [(1, 16, 8), (32, 128, 96), (7, 33, 5)])
def test_scaled_mm_and_emulation_agree(m, k, n):
    """Same float8 values, same scales: they differ only in float32 summation order."""
    g = torch.Generator().manual_seed(k)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    q, s = quantize_per_channel(w)
    a = fp8_linear(x, q, s, use_scaled_mm=True)
    b = fp8_linear(x, q, s, use_scaled_mm=False)
    xq, sx = quantize_per_token(x)
    terms = (xq.float().abs() @ q.float().abs().t()) * sx * s.reshape(1, -1)
    assert torch.all((a - b).abs() <= 4 * k * torch.finfo(torch.float32).eps * terms + 1e-6)


def test_shapes_bias_dtype_and_empty_batch():
    w = torch.randn(12, 20)
    bias = torch.randn(12)
    q, s = quantize_per_channel(w)
    x = torch.randn(2, 5, 20)
    y = fp8_linear(x, q, s, bias, out_dtype=torch.bfloat16)
    assert y.shape == (2, 5, 12) and y.dtype == torch.bfloat16
    flat = fp8_linear(x.reshape(10, 20), q, s, bias)
    assert torch.allclose(y.float(), flat.reshape(2, 5, 12), atol=0.05, rtol=0.01)
    assert fp8_linear(torch.zeros(0, 20), q, s).shape == (0, 12)
    assert fp8_linear(torch.randn(3, 20, dtype=torch.bfloat16), q, s).dtype == torch.bfloat16


def test_fp8_linear_module_from_linear():
    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 10, bias=True)
    fp8 = FP8Linear.from_linear(lin)
    assert set(fp8.state_dict()) == {"weight", "weight_scale", "bias"}
    assert fp8.weight.dtype == FP8_DTYPE and fp8.weight_scale.shape == (10, 1)
    x = torch.randn(4, 24)
    q, s = quantize_per_channel(lin.weight.detach())
    assert torch.equal(fp8(x), fp8_linear(x, q, s, lin.bias.detach()))
    with torch.no_grad():
        assert torch.all((fp8(x) - lin(x)).abs() <= _bound(x, lin.weight.detach()) * 1.001 + 1e-5)
