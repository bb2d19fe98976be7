"""SGLang multimodal processor for Fast-dVLM: Qwen2.5-VL's, bound to our architecture, with our
video path (`video_input.py`: PyAV, the serving caps, the clip's real frame rate)."""

from __future__ import annotations

import copy

from sglang.srt.multimodal.processors.qwen_vl import QwenVLImageProcessor

from . import video_input
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

    @classmethod
    def _load_single_item(cls, data, modality, *args, **kwargs):
        from sglang.srt.multimodal.modality import Modality

        if modality == Modality.VIDEO and not cls._is_preprocessed_input(data):
            return video_input.load_clip(data)  # header only; a bad payload is a ValueError (400)
        return super()._load_single_item(data, modality, *args, **kwargs)

    async def load_mm_data(self, *args, **kwargs):
        base_output = await super().load_mm_data(*args, **kwargs)
        await video_input.prepare_clips(base_output, self._processor, self.io_executor)
        return base_output

    async def process_and_combine_mm_data_async(self, base_output, mm_tokens, **kwargs):
        kwargs.update(video_input.processor_kwargs(base_output))
        return await super().process_and_combine_mm_data_async(base_output, mm_tokens, **kwargs)
