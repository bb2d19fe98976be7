"""Which computation SGLang's compressed-tensors W8A8 FP8 linear runs (`fp8_linear_method.py`):
the reference's on CPU, our Triton GEMM on CUDA for small M, SGLang's own otherwise; and that the
Triton GEMM reads SGLang's post-processed layer (transposed weight view) correctly."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.sglang


def _scheme_and_layer(out_sizes=(16, 8, 8), k=48, seed=0):
    """SGLang's real scheme object and a layer created, loaded and post-processed as its loader does."""
    from compressed_tensors.quantization import QuantizationArgs
    from sglang.srt.layers.quantization.compressed_tensors.schemes.compressed_tensors_w8a8_fp8 import (
        CompressedTensorsW8A8Fp8,
    )

    from fast_dvlm_sglang.quantize.fp8 import quantize_per_channel

    args = QuantizationArgs(num_bits=8, type="float", strategy="channel", symmetric=True, dynamic=False)
    scheme = CompressedTensorsW8A8Fp8(weight_quant=args, is_static_input_scheme=False)
    layer = torch.nn.Module()
    n = sum(out_sizes)
    scheme.create_weights(layer, input_size_per_partition=k, output_partition_sizes=list(out_sizes), input_size=k,
                          output_size=n, params_dtype=torch.float32, weight_loader=None)
    q, s = quantize_per_channel(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)))
    layer.weight.data.copy_(q)
    layer.weight_scale.data.copy_(s)
    scheme.process_weights_after_loading(layer)
    return scheme, layer, q, s


def test_triton_gemm_on_sglangs_processed_layer_is_the_reference():
    """What the CUDA route calls, run here in Triton's interpreter: equal to `fp8_linear` on the
    checkpoint's tensors up to float32 summation order (tests/test_fp8_gemm.py's bound)."""
    from fast_dvlm_sglang.kernels.fp8_gemm import GemmConfig, fp8_gemm
    from fast_dvlm_sglang.quantize.fp8 import fp8_linear

    scheme, layer, q, s = _scheme_and_layer()
    assert layer.weight.shape == (48, 32) and not layer.weight.is_contiguous()  # SGLang's transposed view
    x, bias = torch.randn(5, 48), torch.randn(32)
    got = fp8_gemm(x, layer.weight.t(), layer.weight_scale, bias,
                   config=GemmConfig(block_m=16, block_n=16, block_k=32, split_k=2))
    want = fp8_linear(x, q, s, bias, use_scaled_mm=False)
    torch.testing.assert_close(got, want, atol=1e-5 * float(want.abs().max()), rtol=0)


def test_cpu_goes_to_fp8_linear(monkeypatch):
    from sglang.srt.layers.quantization.compressed_tensors.schemes.compressed_tensors_w8a8_fp8 import (
        CompressedTensorsW8A8Fp8,
    )

    from fast_dvlm_sglang.quantize.fp8 import fp8_linear
    from fast_dvlm_sglang.sglang_plugin import fp8_linear_method

    scheme, layer, q, s = _scheme_and_layer()
    x = torch.randn(3, 48)
    assert torch.equal(fp8_linear_method.apply_weights(CompressedTensorsW8A8Fp8.apply_weights, scheme, layer, x),
                       fp8_linear(x, q, s))


@pytest.mark.parametrize("rows,dtype,env,expected", [
    (32, torch.bfloat16, None, True),   # one block at batch 1
    (1, torch.float16, None, True),     # an AR step
    (64, torch.bfloat16, None, True),   # the default threshold
    (65, torch.bfloat16, None, False),  # above it: SGLang's CUTLASS path
    (512, torch.bfloat16, "1024", True),
    (32, torch.bfloat16, "0", False),   # route off
    (32, torch.float32, None, False),   # SGLang's CUDA path does not take float32 either
])
def test_cuda_route_by_rows_and_dtype(monkeypatch, rows, dtype, env, expected):
    from fast_dvlm_sglang.sglang_plugin import fp8_linear_method

    if env is None:
        monkeypatch.delenv("FAST_DVLM_FP8_GEMM_MAX_M", raising=False)
    else:
        monkeypatch.setenv("FAST_DVLM_FP8_GEMM_MAX_M", env)
    scheme, layer, _, _ = _scheme_and_layer()
    x = SimpleNamespace(is_cuda=True, shape=(rows, 48), dtype=dtype, dim=lambda: 2)
    assert fp8_linear_method.routes_to_triton(scheme, layer, x) is expected


def test_cuda_route_only_for_what_the_kernel_computes(monkeypatch):
    """Per-tensor weight scales and static input scales stay on SGLang's path."""
    from compressed_tensors.quantization import QuantizationStrategy

    from fast_dvlm_sglang.sglang_plugin import fp8_linear_method

    monkeypatch.delenv("FAST_DVLM_FP8_GEMM_MAX_M", raising=False)
    scheme, layer, _, _ = _scheme_and_layer()
    x = SimpleNamespace(is_cuda=True, shape=(32, 48), dtype=torch.bfloat16, dim=lambda: 2)
    assert fp8_linear_method.routes_to_triton(scheme, layer, x)
    layer.input_scale = torch.nn.Parameter(torch.ones(()), requires_grad=False)
    assert not fp8_linear_method.routes_to_triton(scheme, layer, x)
    layer.input_scale = None
    scheme.strategy = QuantizationStrategy.TENSOR
    assert not fp8_linear_method.routes_to_triton(scheme, layer, x)
    monkeypatch.setenv("FAST_DVLM_FP8_GEMM_MAX_M", "many")
    with pytest.raises(ValueError, match="must be an integer"):
        fp8_linear_method.max_m()


def test_cuda_route_calls_the_triton_gemm_with_the_checkpoint_layout(monkeypatch):
    """The CUDA branch of the hook, with the routing decision and the device check spied (no GPU
    here): the Triton GEMM gets the checkpoint's [N, K] weight (SGLang's view transposed back),
    the scale and the bias; a call that does not route reaches SGLang's own apply_weights."""
    from fast_dvlm_sglang.kernels import fp8_gemm
    from fast_dvlm_sglang.sglang_plugin import fp8_linear_method

    scheme, layer, q, s = _scheme_and_layer()
    x, bias = torch.randn(4, 48), torch.randn(32)
    calls = []
    monkeypatch.setattr(fp8_linear_method, "routes_to_triton", lambda *a: True)
    monkeypatch.setattr(fp8_gemm, "supported", lambda device: True)
    monkeypatch.setattr(fp8_gemm, "fp8_gemm", lambda *a: calls.append(a) or "triton")
    sglang = lambda *a: "sglang"  # noqa: E731
    assert fp8_linear_method.apply_weights(sglang, scheme, layer, x, bias) == "triton"
    (got_x, weight, scale, got_bias), = calls
    assert got_x is x and got_bias is bias and scale is layer.weight_scale
    assert torch.equal(weight.view(torch.uint8), q.view(torch.uint8)) and weight.shape == (32, 48)
    monkeypatch.setattr(fp8_gemm, "supported", lambda device: False)  # pre-SM89: SGLang's scheme
    x_cuda_like = x.to("meta")  # neither CPU nor routed: SGLang's own path
    assert fp8_linear_method.apply_weights(sglang, scheme, layer, x_cuda_like, bias) == "sglang"
