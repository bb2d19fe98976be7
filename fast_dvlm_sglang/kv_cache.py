"""The KV cache the decoders append to, read from and roll back.

The decoders only use this interface (`length`, `read`, `append`, `truncate`), so a paged cache
(the kernels' block-causal attention over pages) can replace `DenseKVCache` without touching
them. Keys are stored after RoPE, as every serving engine does.
"""

from __future__ import annotations

from typing import Protocol

import torch


class KVCache(Protocol):
    @property
    def length(self) -> int: ...

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Cached (k, v) of `layer`, each [batch, kv_heads, length, head_dim], or None if empty."""

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the (k, v) of new tokens of `layer`; the length grows once every layer has them."""

    def truncate(self, length: int) -> None:
        """Forget every token at index >= length (speculative rollback)."""


class DenseKVCache:
    """One contiguous tensor pair per layer; appends by concatenation. Simple and exact."""

    def __init__(self, num_layers: int) -> None:
        self._k: list[torch.Tensor | None] = [None] * num_layers
        self._v: list[torch.Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        k = self._k[-1]
        return 0 if k is None else k.shape[2]

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        k, v = self._k[layer], self._v[layer]
        return None if k is None else (k, v)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        old_k, old_v = self._k[layer], self._v[layer]
        self._k[layer] = k if old_k is None else torch.cat([old_k, k], dim=2)
        self._v[layer] = v if old_v is None else torch.cat([old_v, v], dim=2)

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {length}")
        for i, (k, v) in enumerate(zip(self._k, self._v)):
            if k is not None:
                self._k[i], self._v[i] = k[:, :, :length], v[:, :, :length]
