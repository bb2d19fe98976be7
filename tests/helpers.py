"""Shared builders for tests: tiny configs and checkpoints without the tokenizer pipeline."""

from __future__ import annotations

import torch

from fast_dvlm_sglang.checkpoint import save_checkpoint
from fast_dvlm_sglang.config import FastDVLMConfig
from fast_dvlm_sglang.tiny import TINY_TEXT, TINY_VISION, fast_dvlm_config, random_state_dict

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "|<MASK>|"]
BASE_VOCAB = 300
TOKEN_IDS = {name: BASE_VOCAB + i for i, name in enumerate(SPECIAL)}


def tiny_config_dict(**overrides) -> dict:
    text = {**TINY_TEXT, **overrides.pop("text", {})}
    cfg = fast_dvlm_config(TOKEN_IDS, 320, **text, vision=dict(TINY_VISION), **overrides)
    return cfg


def tiny_state_dict(config: dict, seed: int = 0, text_scale: float = 25.0) -> dict[str, torch.Tensor]:
    """Random weights; text matrices scaled up so logits are peaked (no near-ties in argmax)."""
    state = random_state_dict(FastDVLMConfig.from_dict(config), seed)
    for key in state:
        if key.startswith(("model.language_model.", "lm_head")) and state[key].dim() == 2:
            state[key] = state[key] * text_scale
    return state


def write_tiny(path, seed: int = 0, layout: str = "new", **config_overrides):
    config = tiny_config_dict(**config_overrides)
    return save_checkpoint(tiny_state_dict(config, seed), config, path, layout=layout)


def image_prompt(grid=(1, 8, 8), text_before: int = 3, text_after: int = 4, seed: int = 0):
    """(input_ids, pixel_values, image_grid_thw) for one random image between random text."""
    gen = torch.Generator().manual_seed(seed)
    t, h, w = grid
    n_image = t * h * w // 4
    ids = (torch.randint(0, BASE_VOCAB, (text_before,), generator=gen).tolist()
           + [TOKEN_IDS["<|vision_start|>"]] + [TOKEN_IDS["<|image_pad|>"]] * n_image + [TOKEN_IDS["<|vision_end|>"]]
           + torch.randint(0, BASE_VOCAB, (text_after,), generator=gen).tolist())
    pixel_values = torch.randn(t * h * w, 3 * 2 * 14 * 14, generator=gen)
    return ids, pixel_values, torch.tensor([list(grid)])
