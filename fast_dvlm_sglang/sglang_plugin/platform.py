"""An out-of-tree SGLang platform for running on a host with no accelerator.

Why: on a host with neither CUDA nor `SGLANG_USE_CPU_ENGINE=1`, SGLang picks its base platform,
and `RotaryEmbedding.__init__` (sglang/srt/layers/rotary_embedding/base.py, lines 120-140 in
0.5.23) then imports `vllm._custom_ops.rotary_embedding` (never called: the layer runs
`forward_native`). That import is skipped when `current_platform.is_out_of_tree()`. SGLang's own
answer to "a device it does not ship" is a platform plugin (entry-point group
`sglang.srt.platforms`, sglang/srt/platforms/__init__.py `_resolve_platform`); this is one, for
the plain PyTorch CPU path (torch_native attention, pytorch sampling, float32).

It activates only when no accelerator is visible and SGLang's in-tree CPU engine was not asked
for (`SGLANG_USE_CPU_ENGINE=1` needs sgl-kernel's CPU build, which PyPI lacks). On a GPU host
`activate()` returns None and SGLang picks CUDA as usual.
"""

from __future__ import annotations

import os

PLATFORM_CLASS = "fast_dvlm_sglang.sglang_plugin.platform:FastDVLMCpuPlatform"


def _accelerator_visible() -> bool:
    import torch

    if torch.cuda.is_available():
        return True
    for name in ("xpu", "npu", "mps"):
        mod = getattr(torch, name, None)
        try:
            if mod is not None and mod.is_available():
                return True
        except Exception:
            pass
    return False


def activate() -> str | None:
    """Entry point of group `sglang.srt.platforms`: the platform class, or None to stay out."""
    if os.environ.get("SGLANG_USE_CPU_ENGINE", "0") == "1":
        return None
    if os.environ.get("FAST_DVLM_DISABLE_CPU_PLATFORM", "0") == "1":
        return None
    if _accelerator_visible():
        return None
    return PLATFORM_CLASS


def _platform_class():
    from sglang.srt.platforms.cpu import CpuDeviceMixin
    from sglang.srt.platforms.device_mixin import PlatformEnum
    from sglang.srt.platforms.interface import PlatformCapabilities, SRTPlatform

    class _FastDVLMCpuPlatform(CpuDeviceMixin, SRTPlatform):
        """PyTorch-native CPU execution as an out-of-tree platform (no sgl-kernel, no vllm)."""

        _enum = PlatformEnum.OOT
        device_name = "cpu"
        device_type = "cpu"
        capabilities = PlatformCapabilities()  # no triton, no graphs, no pynccl

        def get_default_attention_backend(self) -> str:
            return "torch_native"

        def get_full_graph_backend_cls(self):
            return None

        def get_quantization_config(self, quantization):
            return None

        def get_group_coordinator_device(self, local_rank: int):
            import torch

            return torch.device("cpu")

        def init_backend(self) -> None:
            return None

        def is_pin_memory_available(self, device=None) -> bool:
            return False

    _FastDVLMCpuPlatform.__name__ = "FastDVLMCpuPlatform"
    _FastDVLMCpuPlatform.__qualname__ = "FastDVLMCpuPlatform"
    _FastDVLMCpuPlatform.__module__ = __name__
    return _FastDVLMCpuPlatform


def __getattr__(name: str):  # lazy: importing this module must not import SGLang
    if name == "FastDVLMCpuPlatform":
        cls = _platform_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
