"""The Triton FP8 W8A8 GEMM (`kernels/fp8_gemm.py`) against the FP8 export's computation
(`quantize/fp8.py:fp8_linear`) and a float64 dequantized reference.

On CPU it runs in Triton's interpreter (tests/conftest.py), on a GPU compiled, same file.

Tolerance, from the arithmetic: the activation quantization is bit-identical to the reference
(asserted), and float8 x float8 products are exact in float32, so kernel and reference differ
only in the order of a float32 sum of K products: at most K * 2^-24 * sum_k |xq_k w_k| * s_x * s_w
(the classic bound for recursive summation, used per element); then two scale products and the
bias addition each round once in float32 (4 * 2^-24 of |scaled sum| + |bias|), and the output
rounds to half an ulp of its dtype when it is not float32.
"""

from __future__ import annotations

import pytest
import torch

from fast_dvlm_sglang.kernels.fp8_gemm import (
    GemmConfig,
    config_for,
    fp8_gemm,
    heuristic_config,
    quantize_rows,
)
from fast_dvlm_sglang.quantize.fp8 import fp8_linear, quantize_per_channel, quantize_per_token

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = GemmConfig(block_m=16, block_n=32, block_k=32, split_k=1, num_warps=4, num_stages=2)
SPLIT = GemmConfig(block_m=16, block_n=32, block_k=32, split_k=3, num_warps=4, num_stages=2)
OUT_ULP = {torch.float32: 0.0, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def _case(m, n, k, *, seed=0, bias=True, dtype=torch.float32, spread=4):
    gen = torch.Generator().manual_seed(seed)
    # rows of very different magnitudes (scale edge cases), one row of zeros
    x = torch.randn(m, k, generator=gen) * torch.logspace(-spread, spread, max(m, 1))[:m, None]
    if m > 2:
        x[1] = 0
    wq, ws = quantize_per_channel(torch.randn(n, k, generator=gen) * torch.logspace(-2, 1, n)[:, None])
    b = torch.randn(n, generator=gen) if bias else None
    move = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return move(x.to(dtype)), move(wq), move(ws), move(b)


def _bound(x, wq, ws, b, out, dtype):
    xq, sx = quantize_per_token(x)
    k = x.shape[-1]
    magnitude = (xq.double().abs() @ wq.double().abs().t()) * sx.double() * ws.double().reshape(1, -1)
    bias = 0 if b is None else b.double().abs()
    return (k * 2.0 ** -24 * magnitude + 4 * 2.0 ** -24 * (magnitude + bias)
            + OUT_ULP[dtype] * out.double().abs() + 1e-30)


def _check(x, wq, ws, b, y, dtype):
    want = fp8_linear(x, wq, ws, b, use_scaled_mm=False, out_dtype=torch.float32)
    assert y.dtype == dtype and y.shape == want.shape
    assert not torch.isnan(y).any()
    err = (y.double() - want.double()).abs()
    bound = _bound(x, wq, ws, b, want, dtype)
    assert (err <= bound).all(), f"max err {float(err.max())}, bound there {float(bound.flatten()[err.argmax()])}"
    # and against float64 arithmetic on the dequantized operands (only the summation differs)
    xq, sx = quantize_per_token(x)
    exact = (xq.double() @ wq.double().t()) * sx.double() * ws.double().reshape(1, -1)
    if b is not None:
        exact = exact + b.double()
    assert ((y.double() - exact).abs() <= 2 * bound).all()


@pytest.mark.parametrize("m,config", [(m, SMALL) for m in (1, 2, 31, 32, 33, 64, 100)]
                         + [(m, SPLIT) for m in (1, 32, 100)],
                         ids=lambda v: v if isinstance(v, int) else f"split{v.split_k}")
def test_matches_the_fp8_export_computation(m, config):
    x, wq, ws, b = _case(m, 67, 95, seed=m)  # odd N and K: partial tiles everywhere
    y = fp8_gemm(x, wq, ws, b, config=config)
    _check(x, wq, ws, b, y, torch.float32)


@pytest.mark.parametrize("bias", [True, False])
def test_without_bias_and_with_a_preallocated_poisoned_output(bias):
    x, wq, ws, b = _case(20, 129, 200, seed=3, bias=bias)
    out = torch.full((20, 129), float("nan"), device=DEVICE)
    y = fp8_gemm(x, wq, ws, b, config=SPLIT, out=out)
    assert y.data_ptr() == out.data_ptr()
    _check(x, wq, ws, b, y, torch.float32)


def test_activation_quantization_is_bit_identical():
    """Scales and float8 values equal `quantize_per_token`'s bit for bit, including ties (values
    exactly between two e4m3 numbers round to the even one), subnormals, a row of zeros, rows
    of 1e-30 and 1e30, and saturation at 448."""
    amax = torch.full((1,), 448.0)
    ties = torch.tensor([1.0625, 1.1875, 1.9375, 3.75 + 0.125, 0.0009765625 * 1.5, 2.0 ** -9 * 0.5, 447.0, 440.0])
    rows = [torch.cat([amax, ties, -ties]), torch.zeros(17), torch.full((17,), 1e-30), torch.full((17,), 1e30),
            torch.linspace(-5, 5, 17), torch.randn(17) * 1e4]
    x = torch.stack(rows).to(DEVICE)
    xq, sx = quantize_rows(x)
    rq, rs = quantize_per_token(x)
    assert torch.equal(xq.view(torch.uint8), rq.view(torch.uint8))
    assert torch.equal(sx, rs.reshape(-1))
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(40, 333, generator=gen) * torch.logspace(-6, 6, 40)[:, None]).to(DEVICE)
    xq, sx = quantize_rows(x)
    rq, rs = quantize_per_token(x)
    assert torch.equal(xq.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(sx, rs.reshape(-1))


def test_half_precision_inputs_and_outputs():
    x, wq, ws, b = _case(32, 48, 64, seed=7, dtype=torch.float16, spread=2)  # outputs within float16's range
    y = fp8_gemm(x, wq, ws, b, config=SMALL)
    _check(x, wq, ws, b, y, torch.float16)


def test_zero_rows_and_leading_dimensions():
    x, wq, ws, b = _case(6, 40, 32, seed=8)
    assert fp8_gemm(x[:0], wq, ws, b, config=SMALL).shape == (0, 40)
    y = fp8_gemm(x.view(2, 3, 32), wq, ws, b, config=SMALL)
    assert y.shape == (2, 3, 40)
    _check(x, wq, ws, b, y.view(6, 40), torch.float32)


def test_sglang_weight_layout_is_used_as_stored():
    """SGLang keeps the checkpoint's [N, K] float8 weight as a transposed [K, N] view and passes
    `weight.t()` back: a strided view, read without a copy."""
    x, wq, ws, b = _case(5, 40, 48, seed=9)
    stored = wq.t().contiguous().t()  # same values, column-major storage
    assert not stored.is_contiguous()
    y = fp8_gemm(x, stored, ws, b, config=SMALL)
    _check(x, wq, ws, b, y, torch.float32)


def test_deterministic_split_k():
    x, wq, ws, b = _case(32, 64, 256, seed=10)
    assert torch.equal(fp8_gemm(x, wq, ws, b, config=SPLIT), fp8_gemm(x, wq, ws, b, config=SPLIT))


def test_heuristic_fills_the_gpu_and_respects_small_k():
    """3B shapes at M = 32 on a 132-SM GPU: at least one wave of programs everywhere."""
    for n, k in ((2048, 2048), (2560, 2048), (22016, 2048), (2048, 11008), (256, 2048)):
        cfg = heuristic_config(32, n, k, num_sms=132)
        programs = -(-n // cfg.block_n) * -(-32 // cfg.block_m) * cfg.split_k
        assert programs >= 132 or cfg.split_k == k // (4 * cfg.block_k), (n, k, cfg)
        assert k // cfg.split_k >= 4 * cfg.block_k or cfg.split_k == 1
    assert heuristic_config(1, 64, 64).split_k == 1
    assert config_for(32, 2048, 2048, "cpu").block_m == 32


@pytest.mark.skipif(DEVICE != "cuda", reason="bfloat16 and the committed GPU config table need a GPU")
def test_bfloat16_on_gpu_with_the_committed_configs():
    for n, k in ((2048, 2048), (2048, 11008), (22016, 2048)):
        x, wq, ws, b = _case(32, n, k, seed=11, dtype=torch.bfloat16, spread=2)
        _check(x, wq, ws, b, fp8_gemm(x, wq, ws, b), torch.bfloat16)


def test_config_table_round_trip(tmp_path, monkeypatch):
    """`--tune-gemm` writes the table atomically per GPU name; `config_for` would read it back
    (the committed table has no GPU entry yet: the heuristic serves every shape)."""
    import json

    from fast_dvlm_sglang.kernels import fp8_gemm as mod

    committed = json.loads(mod.CONFIG_TABLE.read_text())
    assert committed["command"] == "python benchmarks/kernels.py --tune-gemm"
    monkeypatch.setattr(mod, "CONFIG_TABLE", tmp_path / "table.json")
    mod._table.cache_clear()
    tuned = GemmConfig(block_m=32, block_n=128, block_k=64, split_k=4)
    mod.write_config_table("Some GPU", {"32x2048x11008": tuned}, "cmd")
    mod.write_config_table("Other GPU", {"1x256x2048": GemmConfig()}, "cmd")
    table = mod._table()
    assert GemmConfig(**table["Some GPU"]["32x2048x11008"]) == tuned and "Other GPU" in table
    assert not list(tmp_path.glob("*.tmp"))
    assert mod.m_bucket(20) == 32 and mod.m_bucket(1) == 1 and mod.m_bucket(1000) == 256
    mod._table.cache_clear()
