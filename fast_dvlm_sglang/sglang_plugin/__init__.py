"""SGLang plugin for Fast-dVLM (entry point `sglang.srt.plugins: fast_dvlm`).

`register()` runs in every SGLang process (sglang/srt/plugins/__init__.py `load_plugins`). It is
idempotent and cheap: it registers transformers' `fast_dvlm` config, our model class in SGLang's
`ModelRegistry` (by SGLang's own `EntryClass` package scan), the `FastDVLMBlock` dLLM algorithm,
the `FastDVLMSpeculative` algorithm, the `fast_dvlm_triton` attention backend (SGLang's attention
registry and `--attention-backend` choices, `triton_attention.py`), and the hooks listed in `hooks.HOOK_TARGETS` (the one
place that names every SGLang symbol the plugin changes). Importing this package does not import SGLang.
"""

from __future__ import annotations

ALGORITHM_NAME = "FastDVLMBlock"
SPEC_ALGORITHM_NAME = "FastDVLMSpeculative"
MODELS_PACKAGE = "fast_dvlm_sglang.sglang_plugin.models"

_done = False


def register() -> None:
    global _done
    if _done:
        return
    from .hf_config import register_transformers

    register_transformers()

    from sglang.srt.models.registry import ModelRegistry

    from fast_dvlm_sglang.config import ARCHITECTURE

    if ARCHITECTURE not in ModelRegistry.models:
        ModelRegistry.register(MODELS_PACKAGE, strict=True)

    from sglang.srt.dllm.algorithm import algo_name_to_cls

    from .algorithm import FastDVLMBlock

    algo_name_to_cls.setdefault(ALGORITHM_NAME, FastDVLMBlock)

    from .triton_attention import register_backend

    register_backend()

    from .hooks import register_all

    register_all()
    from .spec_scheduler import register_algorithm

    register_algorithm()
    _done = True
