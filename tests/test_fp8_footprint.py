"""The FP8 weight footprint (`quantize/footprint.py`) against the reference model's own parameters."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fast_dvlm_sglang.config import FastDVLMConfig
from fast_dvlm_sglang.demo import DEMO_CHECKPOINT
from fast_dvlm_sglang.model import TextModel
from fast_dvlm_sglang.quantize.footprint import language_tower_bytes
from fast_dvlm_sglang.quantize.fp8 import FP8Linear


def _measured(cfg, fp8: bool) -> tuple[int, int]:
    """(linear weight bytes, other bytes) of the reference text tower (+ lm_head if untied), bf16
    source, the decoder linears replaced by `FP8Linear` when `fp8`."""
    model = TextModel(cfg).to(torch.bfloat16)
    linear, other = 0, 0
    for layer in model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for child in parent.children():
                if isinstance(child, torch.nn.Linear):
                    if child.bias is not None:
                        other += child.bias.numel() * 2
                    if fp8:
                        q = FP8Linear.from_linear(child)
                        linear += q.weight.numel() * q.weight.element_size() + q.weight_scale.numel() * 4
                    else:
                        linear += child.weight.numel() * 2
    counted = {id(p) for layer in model.layers for parent in (layer.self_attn, layer.mlp) for p in parent.parameters()}
    other += sum(p.numel() * 2 for p in model.parameters() if id(p) not in counted)
    if not cfg.tie_word_embeddings:
        other += cfg.vocab_size * cfg.hidden_size * 2  # lm_head
    return linear, other


@pytest.mark.parametrize("tied", [True, False])
def test_formula_matches_the_reference_model(tied):
    cfg = dataclasses.replace(FastDVLMConfig.from_dir(DEMO_CHECKPOINT).text, tie_word_embeddings=tied)
    for fp8 in (False, True):
        got = language_tower_bytes(cfg, fp8=fp8)
        assert (got.linear_weights, got.other) == _measured(cfg, fp8)


def test_fp8_halves_the_3b_linears():
    from fast_dvlm_sglang.random_checkpoint import FAST_DVLM_3B_TEXT, FAST_DVLM_3B_VOCAB

    demo = FastDVLMConfig.from_dir(DEMO_CHECKPOINT).text
    cfg = dataclasses.replace(demo, vocab_size=FAST_DVLM_3B_VOCAB, tie_word_embeddings=True,
                              **{k: tuple(v) if isinstance(v, list) else v for k, v in FAST_DVLM_3B_TEXT.items()})
    bf16, fp8 = language_tower_bytes(cfg, fp8=False), language_tower_bytes(cfg, fp8=True)
    assert 0.5 < fp8.linear_weights / bf16.linear_weights < 0.501  # + one float32 scale per channel
    assert fp8.other == bf16.other
    assert 0.5 < fp8.total / bf16.total < 0.6  # the 311 M-parameter embedding stays bf16
