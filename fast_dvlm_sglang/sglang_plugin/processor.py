"""SGLang multimodal processor for Fast-dVLM: Qwen2.5-VL's, bound to our architecture."""

from __future__ import annotations

import copy

from sglang.srt.multimodal.processors.qwen_vl import QwenVLImageProcessor

from .model import Fast_dVLMForConditionalGeneration

QWEN_MODEL_TYPE = "qwen2_5_vl"


class FastDVLMImageProcessor(QwenVLImageProcessor):
    models = [Fast_dVLMForConditionalGeneration]

    def __init__(self, hf_config, server_args, _processor, *args, **kwargs):
        # SGLang's Qwen-VL processor branches on `hf_config.model_type` from the first line of
        # its __init__ (preprocessing concurrency and worker counts, M-RoPE index rules for
        # Qwen3/Omni variants). Ours is Qwen2.5-VL's: it sees a shallow copy of the config under
        # that model type (the server's own config keeps `fast_dvlm`).
        as_qwen = copy.copy(hf_config)
        as_qwen.model_type = QWEN_MODEL_TYPE
        super().__init__(as_qwen, server_args, _processor, *args, **kwargs)
