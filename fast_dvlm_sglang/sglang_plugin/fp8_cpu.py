"""W8A8 FP8 checkpoints on SGLang's CPU path (CI and development; on CUDA SGLang's own kernels run).

SGLang 0.5.23's compressed-tensors W8A8 FP8 scheme assumes a GPU: it asks the CUDA driver for the
compute capability (no driver on a CPU host), accepts only float16/bfloat16 activations (our CPU
path runs float32), and runs its CUDA GEMM (`apply_fp8_linear`). On a host without CUDA these
hooks (listed in `hooks.HOOK_TARGETS`) make the scheme the reference's computation,
`quantize/fp8.py:fp8_linear` (per-token float8 activations, `torch._scaled_mm` on CPU), so the
server and the reference decoders run the same math. Nothing changes where CUDA is available.
"""

from __future__ import annotations

import torch


def _cpu_host() -> bool:
    return not torch.cuda.is_available()


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


def apply_weights(original, scheme, layer, x, bias=None):
    if isinstance(x, torch.Tensor) and x.device.type == "cpu" and getattr(scheme, "weight_block_size", None) is None:
        from fast_dvlm_sglang.quantize.fp8 import fp8_linear

        # process_weights_after_loading stored the weight transposed ([in, out]); a view back.
        return fp8_linear(x, layer.weight.t(), layer.weight_scale, bias)
    return original(scheme, layer, x, bias)
