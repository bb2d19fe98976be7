"""Where SGLang's compressed-tensors W8A8 FP8 linear method runs our computation instead of its own.

- **CPU** (CI and development). SGLang 0.5.23's W8A8 FP8 scheme assumes a GPU: it asks the CUDA
  driver for the compute capability (none on a CPU host), accepts only float16/bfloat16
  activations (our CPU path runs float32), and runs its CUDA GEMM (`apply_fp8_linear`). On a host
  without CUDA the scheme becomes the reference's computation, `quantize/fp8.py:fp8_linear`
  (per-token float8 activations, `torch._scaled_mm` on CPU), so server and reference decoders run
  the same math.
- **CUDA, small M** (a 32-token block at batch 1, an AR step). Per-channel weights with dynamic
  per-token activations go to our Triton GEMM (`kernels/fp8_gemm.py`) when the layer's input has
  at most `FAST_DVLM_FP8_GEMM_MAX_M` rows (default 64, until the GPU benchmark
  `benchmarks/kernels.py` measures where SGLang's CUTLASS path starts to win; 0 turns the route
  off). Larger M, per-tensor or block scales, static input scales, pre-quantized inputs and ROCm
  stay on SGLang's path.

The hooks are listed in `hooks.HOOK_TARGETS`.
"""

from __future__ import annotations

import os

import torch

DEFAULT_MAX_M = 64


def _cpu_host() -> bool:
    return not torch.cuda.is_available()


def max_m() -> int:
    """Largest row count routed to our Triton GEMM on CUDA (FAST_DVLM_FP8_GEMM_MAX_M)."""
    value = os.environ.get("FAST_DVLM_FP8_GEMM_MAX_M", str(DEFAULT_MAX_M))
    try:
        return max(0, int(value))
    except ValueError:
        raise ValueError(f"FAST_DVLM_FP8_GEMM_MAX_M must be an integer, got {value!r}") from None


def check_scheme_supported(original, config, min_capability: int, error: bool = True) -> bool:
    """No CUDA driver to ask: the CPU runs every W8A8 FP8 scheme through `fp8_linear`."""
    if _cpu_host():
        return True
    return original(config, min_capability, error)


def supported_act_dtypes(original, *args):
    dtypes = list(original(*args))
    if _cpu_host() and torch.float32 not in dtypes:
        dtypes.append(torch.float32)
    return dtypes


def routes_to_triton(scheme, layer, x) -> bool:
    """A CUDA call our small-M GEMM computes exactly as the FP8 export's scheme defines it."""
    from compressed_tensors.quantization import QuantizationStrategy

    return (x.is_cuda and x.dim() == 2 and 0 < x.shape[0] <= max_m()
            and x.dtype in (torch.bfloat16, torch.float16)
            and getattr(scheme, "strategy", None) == QuantizationStrategy.CHANNEL
            and getattr(layer, "input_scale", None) is None
            and layer.weight.dtype == torch.float8_e4m3fn and layer.weight.dim() == 2)


def apply_weights(original, scheme, layer, x, bias=None):
    if not isinstance(x, torch.Tensor) or getattr(scheme, "weight_block_size", None) is not None:
        return original(scheme, layer, x, bias)
    # process_weights_after_loading stored the weight transposed ([in, out] view of the
    # checkpoint's [out, in]); `.t()` is the checkpoint layout again, without a copy.
    if routes_to_triton(scheme, layer, x):  # CUDA tensors only
        from fast_dvlm_sglang.kernels import fp8_gemm

        if fp8_gemm.supported(x.device):  # SM89+ (older GPUs get SGLang's W8A16 scheme anyway)
            return fp8_gemm.fp8_gemm(x, layer.weight.t(), layer.weight_scale, bias)
    if x.device.type == "cpu":
        from fast_dvlm_sglang.quantize.fp8 import fp8_linear

        return fp8_linear(x, layer.weight.t(), layer.weight_scale, bias)
    return original(scheme, layer, x, bias)
