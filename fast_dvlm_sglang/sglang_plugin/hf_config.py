"""transformers-side registration of `model_type: "fast_dvlm"`.

Fast_dVLM_3B's config.json says `model_type: "fast_dvlm"`, which transformers does not know. The
weights and config are Qwen2.5-VL's, so the config class is Qwen2.5-VL's with another model_type;
the processor and image processor are Qwen2.5-VL's. Registration is idempotent.
"""

from __future__ import annotations

from fast_dvlm_sglang.config import MODEL_TYPE

_registered = False


# One class for both: the file every checkpoint carries for processes without this package
# (`checkpoint.with_auto_config`) is the class registered here (module level: SGLang pickles it).
from fast_dvlm_sglang.configuration_fast_dvlm import FastDVLMConfig as FastDVLMHFConfig  # noqa: E402


def fast_dvlm_config_class():
    return FastDVLMHFConfig


def register_config() -> None:
    """AutoConfig knows `fast_dvlm` afterwards, from this package's class: loading a checkpoint
    (its tokenizer too) then runs none of the checkpoint's own code, though its config.json names
    some (`auto_map`, `configuration_fast_dvlm.py`, for processes without this package); without
    it transformers would ask whether to trust that code. Needs no torchvision (.venv has none)."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if MODEL_TYPE not in CONFIG_MAPPING:
        AutoConfig.register(MODEL_TYPE, fast_dvlm_config_class(), exist_ok=True)


def register_transformers() -> None:
    """AutoConfig / AutoProcessor / AutoImageProcessor know `fast_dvlm` afterwards."""
    global _registered
    if _registered:
        return
    from transformers import AutoImageProcessor, AutoProcessor

    cfg_cls = fast_dvlm_config_class()
    register_config()
    try:
        from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor

        AutoProcessor.register(cfg_cls, Qwen2_5_VLProcessor, exist_ok=True)
        AutoImageProcessor.register(cfg_cls, slow_image_processor_class=Qwen2VLImageProcessor, exist_ok=True)
    except (TypeError, ValueError):  # signature differences across transformers 5.x minors
        pass
    _registered = True
