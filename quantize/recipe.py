"""The llmcompressor recipe for Fast-dVLM: SmoothQuant, then W8A8 FP8 (`scheme.py`'s format).

SmoothQuant mappings are anchored on the language tower (`model.language_model.layers.N.`):
llmcompressor 0.14's default Qwen2.5-VL mappings also match the vision tower's gate/up
projections, merge the layers into one group and fail ("must match a single smooth layer").
- q/k/v <- input_layernorm and gate/up <- post_attention_layernorm: the norms absorb the scales;
- down <- up: the up projection absorbs them (its output feeds down_proj elementwise);
- v -> o only with as many KV heads as query heads: with GQA v_proj has fewer output channels
  than o_proj has inputs, and llmcompressor's mapping fails on the shape mismatch.
The vision tower and `lm_head` stay in the source precision (the `ignore` list).
"""

from __future__ import annotations

from fast_dvlm_sglang.config import TextConfig

from .scheme import INPUT_ACTIVATIONS, WEIGHTS

LAYER = r"re:model\.language_model\.layers\.\d+\."
IGNORE = ["lm_head", r"re:model\.visual\..*"]


def smoothquant_mappings(text: TextConfig) -> list[list]:
    mappings = [
        [[LAYER + r"self_attn\.q_proj$", LAYER + r"self_attn\.k_proj$", LAYER + r"self_attn\.v_proj$"],
         LAYER + r"input_layernorm$"],
        [[LAYER + r"mlp\.gate_proj$", LAYER + r"mlp\.up_proj$"], LAYER + r"post_attention_layernorm$"],
        [[LAYER + r"mlp\.down_proj$"], LAYER + r"mlp\.up_proj$"],
    ]
    if text.num_key_value_heads == text.num_attention_heads:
        mappings.append([[LAYER + r"self_attn\.o_proj$"], LAYER + r"self_attn\.v_proj$"])
    return mappings


def recipe(text: TextConfig, alpha: float, *, quantize: bool = True) -> list:
    """[SmoothQuantModifier(alpha), QuantizationModifier(W8A8 FP8)] (quantize=False: smoothing only)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    modifiers = [SmoothQuantModifier(smoothing_strength=alpha, mappings=smoothquant_mappings(text))]
    if quantize:
        scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**WEIGHTS),
                                    input_activations=QuantizationArgs(**INPUT_ACTIVATIONS))
        modifiers.append(QuantizationModifier(config_groups={"group_0": scheme}, ignore=list(IGNORE)))
    return modifiers
