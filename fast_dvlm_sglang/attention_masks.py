"""Boolean attention masks (True = may attend) for the three attention patterns of Fast-dVLM.

Shapes are [query_len, key_len]; the model broadcasts them over batch and heads. New tokens sit
after `cached` tokens of context that every new token may see.
- causal: prefill, AR steps, the speculative verify pass and the KV write of a finished block;
- block-bidirectional: a block of new tokens sees all cached context and every token of the block
  (MDM iterations and the speculative draft pass);
- training layout (paper's "causal context attention"): see `training_mask`.
"""

from __future__ import annotations

import torch


def causal_mask(new: int, cached: int = 0, device: torch.device | str | None = None) -> torch.Tensor:
    q = torch.arange(new, device=device)[:, None] + cached
    k = torch.arange(cached + new, device=device)[None, :]
    return tag_mask(k <= q, CAUSAL)


def block_bidirectional_mask(new: int, cached: int = 0, device: torch.device | str | None = None) -> torch.Tensor:
    return tag_mask(torch.ones(new, cached + new, dtype=torch.bool, device=device), BLOCK_BIDIRECTIONAL)


# The two structured patterns carry their name, so that the model can hand them to the attention
# kernel (`kernels/block_attention.py`, which never materialises a mask) instead of reading the
# tensor; a mask without a name (the training layout, a caller's own) always runs as given.
CAUSAL = "causal"
BLOCK_BIDIRECTIONAL = "block_bidirectional"
_KIND = "fast_dvlm_attention_kind"


def tag_mask(mask: torch.Tensor, kind: str | None) -> torch.Tensor:
    if kind is not None:
        setattr(mask, _KIND, kind)
    return mask


def mask_kind(mask: torch.Tensor) -> str | None:
    """`CAUSAL`, `BLOCK_BIDIRECTIONAL`, or None for any other mask."""
    return getattr(mask, _KIND, None)


def training_mask(clean_len: int, noisy_block_start: torch.Tensor, noisy_block_id: torch.Tensor) -> torch.Tensor:
    """Mask over the concatenation [noisy tokens | clean tokens] of one training sample.

    `noisy_block_start[i]` is the index in the clean stream where noisy token i's block starts,
    `noisy_block_id[i]` identifies its block. Noisy tokens see their own block bidirectionally
    (N2N) and the clean tokens strictly before their block (N2C); clean tokens are causal (C2C)
    and never see noisy tokens.
    """
    n = noisy_block_id.shape[0]
    device = noisy_block_id.device
    mask = torch.zeros(n + clean_len, n + clean_len, dtype=torch.bool, device=device)
    mask[:n, :n] = noisy_block_id[:, None] == noisy_block_id[None, :]
    mask[:n, n:] = torch.arange(clean_len, device=device)[None, :] < noisy_block_start[:, None]
    mask[n:, n:] = causal_mask(clean_len, device=device)
    return mask
