"""One request's forwards over the reference model: prefill, then causal or block-bidirectional
forwards of new tokens over the KV cache, each counted as one NFE (function evaluation)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention_masks import block_bidirectional_mask, causal_mask
from ..kv_cache import DenseKVCache, KVCache


@dataclass(frozen=True)
class Prompt:
    """A tokenized prompt; images and videos already expanded to their pad tokens."""

    input_ids: list[int]
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    second_per_grid_ts: tuple[float, ...] | None = None

    @classmethod
    def from_encoded(cls, enc) -> Prompt:
        """From `processing.encode_chat`'s output."""
        return cls(enc.input_ids, enc.pixel_values, enc.image_grid_thw, enc.pixel_values_videos,
                   enc.video_grid_thw, enc.second_per_grid_ts)

    def embed_and_positions(self, model) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt's embeddings [1, T, H] (vision features in place) and M-RoPE positions [3, 1, T]."""
        device = model.device

        def on(x):
            return x.to(device) if x is not None else None

        ids = torch.tensor([self.input_ids], device=device)
        embeds = model.embed(ids, on(self.pixel_values), on(self.image_grid_thw), on(self.pixel_values_videos),
                             on(self.video_grid_thw))
        positions = model.rope_positions(ids, on(self.image_grid_thw), on(self.video_grid_thw),
                                         self.second_per_grid_ts)
        return embeds, positions


class DecodeSession:
    def __init__(self, model, prompt: Prompt, cache: KVCache | None = None) -> None:
        self.model = model
        self.prompt = prompt
        self.cache = cache if cache is not None else DenseKVCache(model.config.text.num_hidden_layers)
        self.nfe = 0
        self._position_offset = 0  # position of sequence index i (after the prompt) is i + offset

    @torch.inference_mode()
    def prefill(self) -> torch.Tensor:
        """Causal forward of the prompt into the cache; returns the last position's logits [V]."""
        device = self.model.device
        embeds, positions = self.prompt.embed_and_positions(self.model)
        n = embeds.shape[1]
        self._position_offset = int(positions.max()) + 1 - n
        mask = causal_mask(n, self.cache.length, device=device)
        return self.model(embeds, positions, mask, self.cache, write_cache=True)[0, -1]

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor | list[int], *, bidirectional: bool, write: bool) -> torch.Tensor:
        """Logits [L, V] of `tokens` placed right after the cache; one NFE."""
        device = self.model.device
        tokens = torch.as_tensor(tokens, device=device).view(1, -1)
        cached, new = self.cache.length, tokens.shape[1]
        pos = torch.arange(cached, cached + new, device=device) + self._position_offset
        positions = pos.view(1, 1, -1).expand(3, 1, -1)
        make_mask = block_bidirectional_mask if bidirectional else causal_mask
        mask = make_mask(new, cached, device=device)
        self.nfe += 1
        embeds = self.model.model.language_model.embed_tokens(tokens)
        return self.model(embeds, positions, mask, self.cache, write_cache=write)[0]
