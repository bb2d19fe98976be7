"""Weight bytes of the language tower in the source precision and in W8A8 FP8, from the config.

What FP8 changes: each linear weight of the decoder layers (q/k/v/o, gate/up/down) becomes one
byte per parameter plus one float32 scale per output channel; biases, norms, the embedding and
`lm_head` (tied or not) and the vision tower keep the source precision. So the linears halve and
the tower as a whole shrinks by a little less (the embedding is a large part of a small model).
"""

from __future__ import annotations

import dataclasses

from fast_dvlm_sglang.config import TextConfig

SCALE_BYTES = 4  # float32 per output channel


@dataclasses.dataclass(frozen=True)
class TowerBytes:
    linear_weights: int  # the decoder layers' linear weights (what FP8 quantizes)
    other: int  # biases, norms, embedding, lm_head: unchanged by FP8

    @property
    def total(self) -> int:
        return self.linear_weights + self.other


def _layer_linears(cfg: TextConfig) -> list[tuple[int, int]]:
    """(out, in) of each decoder layer's linear layers."""
    h, kv, i = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim, cfg.intermediate_size
    q = cfg.num_attention_heads * cfg.head_dim
    return [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]


def language_tower_bytes(cfg: TextConfig, *, fp8: bool, source_bytes: int = 2) -> TowerBytes:
    """Weight bytes of the language tower (`source_bytes` per source parameter: 2 for bf16)."""
    linears = _layer_linears(cfg)
    weight_params = sum(o * i for o, i in linears)
    channels = sum(o for o, _ in linears)
    per_layer = weight_params + channels * SCALE_BYTES if fp8 else weight_params * source_bytes
    h = cfg.hidden_size
    biases = cfg.num_attention_heads * cfg.head_dim + 2 * cfg.num_key_value_heads * cfg.head_dim  # q, k, v
    other_params = cfg.num_hidden_layers * (biases + 2 * h) + h + cfg.vocab_size * h * (
        1 if cfg.tie_word_embeddings else 2)
    return TowerBytes(linear_weights=cfg.num_hidden_layers * per_layer, other=other_params * source_bytes)
