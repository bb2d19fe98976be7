"""Tiny checkpoints with exactly the config format of Fast_dVLM_3B, for offline tests.

`fast_dvlm_config` builds a config.json dict with every key of the released Qwen2.5-VL-3B-based
config; the tiny model only shrinks the dimensions (and the vocabulary, through our own small
tokenizer whose special tokens and chat template match the released one).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import save_checkpoint
from .config import ARCHITECTURE, DEFAULT_BLOCK_SIZE, MASK_TOKEN, MODEL_TYPE, FastDVLMConfig

TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, mrope_section=[2, 3, 3])
TINY_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, fullatt_block_indexes=[1])


def fast_dvlm_config(
    token_ids: dict[str, int],
    vocab_size: int,
    *,
    hidden_size: int,
    intermediate_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    mrope_section: list[int],
    vision: dict,
    tie_word_embeddings: bool = True,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> dict:
    """A config.json dict in the released format (flat text keys, as Fast_dVLM_3B ships it)."""
    vision_config = {
        "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
        "in_chans": 3, "out_hidden_size": hidden_size, "patch_size": 14, "spatial_merge_size": 2,
        "spatial_patch_size": 14, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2, "temporal_patch_size": 2, "initializer_range": 0.02,
    }
    vision_config.update(vision)
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "bd_size": block_size,
        "attention_dropout": 0.0,
        "bos_token_id": token_ids["<|endoftext|>"],
        "eos_token_id": token_ids["<|im_end|>"],
        "pad_token_id": token_ids["<|endoftext|>"],
        "mask_token_id": token_ids[MASK_TOKEN],
        "vision_start_token_id": token_ids["<|vision_start|>"],
        "vision_end_token_id": token_ids["<|vision_end|>"],
        "vision_token_id": token_ids["<|vision_pad|>"],
        "image_token_id": token_ids["<|image_pad|>"],
        "video_token_id": token_ids["<|video_pad|>"],
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": 4096,
        "max_window_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_hidden_layers": num_hidden_layers,
        "num_key_value_heads": num_key_value_heads,
        "rms_norm_eps": 1e-6,
        "rope_scaling": {"type": "mrope", "rope_type": "default", "mrope_section": list(mrope_section)},
        "rope_theta": 1000000.0,
        "sliding_window": 4096,
        "use_sliding_window": False,
        "tie_word_embeddings": tie_word_embeddings,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": vocab_size,
        "vision_config": vision_config,
    }


def generation_config(token_ids: dict[str, int]) -> dict:
    return {
        "bos_token_id": token_ids["<|endoftext|>"],
        "eos_token_id": [token_ids["<|im_end|>"], token_ids["<|endoftext|>"]],
        "pad_token_id": token_ids["<|endoftext|>"],
        "do_sample": False,
    }


def random_state_dict(cfg: FastDVLMConfig, seed: int, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Deterministic random weights (normal(0, std) matrices, unit norms, zero biases).

    A larger std than training init makes random models' logits peaked enough that greedy
    argmax ties are practically impossible, which exact-equality tests rely on.
    """
    from .model import FastDVLMForConditionalGeneration

    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: (v.shape, v.dtype) for k, v in FastDVLMForConditionalGeneration(cfg).state_dict().items()}
    out = {}
    for key in sorted(shapes):
        shape, _ = shapes[key]
        if key.endswith("norm.weight") or key.endswith("norm1.weight") or key.endswith("norm2.weight") or key.endswith("ln_q.weight"):
            out[key] = torch.ones(shape)
        elif key.endswith(".bias"):
            out[key] = torch.randn(shape, generator=gen) * std
        else:
            out[key] = torch.randn(shape, generator=gen) * std
    if cfg.text.tie_word_embeddings:
        out["lm_head.weight"] = out["model.language_model.embed_tokens.weight"]
    return out


def tokenizer_for_tiny():
    """Our small byte-level BPE with the released special tokens, trained on the demo corpus."""
    from .demo.shapes import corpus_for_tokenizer
    from .tokenizer import train_tokenizer

    return train_tokenizer(corpus_for_tokenizer(seed=0, n=2000), vocab_size=512)


def make_tiny_checkpoint(
    out_dir: str | Path,
    *,
    seed: int = 0,
    layout: str = "new",
    tie_word_embeddings: bool = True,
    std: float = 0.5,
    max_shard_bytes: int | None = None,
    text: dict | None = None,
    vision: dict | None = None,
    tokenizer=None,
) -> Path:
    """Write a random tiny Fast-dVLM checkpoint (config, weights, tokenizer, processor files)."""
    import json
    import tempfile

    from .tokenizer import SPECIAL_TOKENS, write_tokenizer_files

    tokenizer = tokenizer or tokenizer_for_tiny()
    token_ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    vocab_size = -(-len(tokenizer) // 64) * 64
    config = fast_dvlm_config(token_ids, vocab_size, **{**TINY_TEXT, **(text or {})},
                              vision={**TINY_VISION, **(vision or {})}, tie_word_embeddings=tie_word_embeddings)
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer_files(tokenizer, tmp)
        extra = {p.name: p.read_bytes() for p in Path(tmp).iterdir()}
    extra["generation_config.json"] = json.dumps(generation_config(token_ids), indent=2) + "\n"
    cfg = FastDVLMConfig.from_dict(config)
    state = random_state_dict(cfg, seed, std=0.02)
    # Scale only the text matrices up: a peaked output distribution keeps greedy decisions stable.
    for key in state:
        if key.startswith(("model.language_model.", "lm_head")) and state[key].dim() == 2:
            state[key] = state[key] * (std / 0.02)
    return save_checkpoint(state, config, out_dir, layout=layout, max_shard_bytes=max_shard_bytes, extra_files=extra)
