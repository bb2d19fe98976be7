"""Fast-dVLM's transformers config, written into every checkpoint we save (`checkpoint.py`) and
named by its config.json `auto_map`, so that a process without this package (SGLang's benchmark
client, lm-eval, a notebook) loads the config with `trust_remote_code=True`:
`AutoConfig.from_pretrained(path, trust_remote_code=True)`, and with it `AutoProcessor`
(Qwen2.5-VL's, named by preprocessor_config.json). Standalone on purpose: it imports transformers
only. Where this package is imported it registers this module's class itself
(`sglang_plugin/hf_config.py`) and never runs a checkpoint's copy.
"""

from transformers import Qwen2_5_VLConfig


class FastDVLMConfig(Qwen2_5_VLConfig):
    """Qwen2.5-VL's config (the weights and shapes are Qwen2.5-VL-3B's) under `model_type: "fast_dvlm"`."""

    model_type = "fast_dvlm"
