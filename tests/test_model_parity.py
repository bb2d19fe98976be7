"""Our causal forward equals transformers' Qwen2_5_VLForConditionalGeneration on the same weights."""

import pytest
import torch
from helpers import image_prompt, tiny_config_dict, tiny_state_dict

from fast_dvlm_sglang.attention_masks import causal_mask
from fast_dvlm_sglang.config import FastDVLMConfig
from fast_dvlm_sglang.model import FastDVLMForConditionalGeneration, vision_kwargs

# float32 end to end; both sides compute the same sums in a different order (SDPA vs ours,
# fused QKV order), so differences stay at a few ulps of logits of magnitude ~10.
ATOL, RTOL = 1e-4, 1e-5


def _pair(seed: int, tie: bool):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    raw = tiny_config_dict(tie_word_embeddings=tie)
    state = tiny_state_dict(raw, seed, text_scale=5.0)
    ours = FastDVLMForConditionalGeneration(FastDVLMConfig.from_dict(raw))
    ours.load_state_dict(state, strict=True)
    hf_raw = {k: v for k, v in raw.items() if k not in ("architectures", "model_type", "bd_size", "vision_config")}
    hf_cfg = Qwen2_5_VLConfig(**hf_raw, vision_config=vision_kwargs(raw["vision_config"]))
    hf_cfg._attn_implementation = "sdpa"
    hf_cfg.vision_config._attn_implementation = "sdpa"
    hf_cfg.text_config._attn_implementation = "sdpa"
    hf = Qwen2_5_VLForConditionalGeneration(hf_cfg)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    return ours.eval(), hf.eval()


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("tie", [True, False])
@torch.no_grad()
def test_text_forward_matches_transformers(seed, tie):
    ours, hf = _pair(seed, tie)
    ids = torch.randint(0, 300, (2, 23), generator=torch.Generator().manual_seed(seed))
    expected = hf(input_ids=ids).logits
    pos = ours.rope_positions(ids)
    got = ours(ours.embed(ids), pos, causal_mask(ids.shape[1]))
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("grid", [(1, 8, 8), (1, 4, 6)])
@torch.no_grad()
def test_image_forward_matches_transformers(grid):
    ours, hf = _pair(3, True)
    ids, pv, thw = image_prompt(grid=grid, seed=7)
    ids = torch.tensor([ids])
    image_token = ours.config.image_token_id
    mm_types = (ids == image_token).int()
    expected = hf(input_ids=ids, pixel_values=pv, image_grid_thw=thw, mm_token_type_ids=mm_types).logits
    pos = ours.rope_positions(ids, thw)
    got = ours(ours.embed(ids, pv, thw), pos, causal_mask(ids.shape[1]))
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
    # The image must matter, or the test above would not test the vision path.
    no_image = ours(ours.embed(ids, torch.zeros_like(pv), thw), pos, causal_mask(ids.shape[1]))
    assert (no_image - got).abs().max() > 1e-3


def test_image_positions_match_transformers_rope_index():
    ours, hf = _pair(0, True)
    ids, _, thw = image_prompt(grid=(1, 4, 6), seed=1)
    ids = torch.tensor([ids])
    expected, _ = hf.model.get_rope_index(ids, mm_token_type_ids=(ids == ours.config.image_token_id).int(), image_grid_thw=thw)
    assert torch.equal(ours.rope_positions(ids, thw), expected)
