"""SGLang multimodal processor for Fast-dVLM: Qwen2.5-VL's, bound to our architecture."""

from __future__ import annotations

from sglang.srt.multimodal.processors.qwen_vl import QwenVLImageProcessor

from .model import Fast_dVLMForConditionalGeneration


class FastDVLMImageProcessor(QwenVLImageProcessor):
    models = [Fast_dVLMForConditionalGeneration]

    def __init__(self, hf_config, server_args, _processor, *args, **kwargs):
        super().__init__(hf_config, server_args, _processor, *args, **kwargs)
        # Qwen2.5-VL's M-RoPE index rules (SGLang branches on model_type for Qwen3/Omni variants).
        self.model_type = "qwen2_5_vl"
