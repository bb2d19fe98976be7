"""The Fast-dVLM conversion recipe (AR VLM -> block diffusion) as plain functions over tensors.

One training example is laid out as ``[noisy copy A | noisy copy B | clean stream]``:

* the clean stream is the whole chat-templated conversation (vision tokens included), trained
  with the usual causal next-token loss on the assistant tokens (token shift);
* the noisy copies hold only the assistant response tokens (no vision, no prompt: the paper's
  "vision-efficient concatenation"), each at the M-RoPE position of its clean twin;
* response tokens are grouped into blocks per assistant turn (auto-truncation: a block starts at
  the response start or right after the previous block, and the last block of a turn ends at its
  ``<|im_end|>``, so it may be shorter); optionally the first block of each turn has a random
  length in [1, block_size) so later blocks start at arbitrary offsets (a speculative round
  drafts from wherever the previous round stopped);
* within a noisy block the first token always stays visible (at decoding it comes from the
  causal logits), the closing ``<|im_end|>`` is always masked, every other token is masked with
  the block's noise level p = (1 - eps) * U(0, 1) + eps in copy A and exactly the other way
  round in copy B (complementary masking);
* attention (``attention_masks.training_mask``): noisy -> own block bidirectionally and clean
  tokens strictly before the block start; clean -> clean causally; clean never sees noisy;
* token shift as in decoding: masked noisy token j is predicted from the noisy output at j - 1;
* loss = 0.5 * CE(masked noisy positions of both copies) + 1.0 * AR CE(clean stream).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..attention_masks import causal_mask, training_mask

IGNORE = -100
BLOCK_SIZES = (4, 8, 16, 32)
EPS = 1e-3


def block_size_schedule(progress: float, sizes: tuple[int, ...] = BLOCK_SIZES) -> int:
    """Block-size annealing: the size grows through ``sizes`` with sqrt(progress in [0, 1])."""
    progress = min(max(float(progress), 0.0), 1.0)
    return sizes[min(int(math.sqrt(progress) * len(sizes)), len(sizes) - 1)]


def response_segments(turn_ids: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) clean indices of each assistant response (turn_ids >= 0), in order."""
    segs: list[tuple[int, int]] = []
    ids = turn_ids.tolist()
    i = 0
    while i < len(ids):
        if ids[i] < 0:
            i += 1
            continue
        j = i
        while j < len(ids) and ids[j] == ids[i]:
            j += 1
        segs.append((i, j))
        i = j
    return segs


@dataclass(frozen=True)
class Blocks:
    positions: torch.Tensor  # [N] clean index of every response token, in order
    block_start: torch.Tensor  # [N] clean index where that token's block starts
    block_index: torch.Tensor  # [N] 0..num_blocks-1, unique across turns

    @property
    def num_blocks(self) -> int:
        return int(self.block_index.max()) + 1 if self.block_index.numel() else 0


def auto_truncate_blocks(turn_ids: torch.Tensor, block_size: int, first_lengths: list[int] | None = None) -> Blocks:
    """Blocks of ``block_size`` response tokens per turn, starting at the response start.

    ``first_lengths[k]`` (optional, in [1, block_size]) is the length of turn k's first block.
    A block never crosses the end of its turn: the last block of a turn is truncated there.
    """
    positions, starts, index = [], [], []
    b = 0
    for k, (s, e) in enumerate(response_segments(turn_ids)):
        first = block_size if first_lengths is None else max(1, min(int(first_lengths[k]), block_size))
        start, length = s, first
        while start < e:
            end = min(start + length, e)
            positions.extend(range(start, end))
            starts.extend([start] * (end - start))
            index.extend([b] * (end - start))
            b += 1
            start, length = end, block_size
    as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return Blocks(as_long(positions), as_long(starts), as_long(index))


def noise_levels(num_blocks: int, generator: torch.Generator | None = None, eps: float = EPS) -> torch.Tensor:
    """Per-block mask probability p = (1 - eps) * U(0, 1) + eps."""
    return (1 - eps) * torch.rand(num_blocks, generator=generator) + eps


def complementary_masks(
    blocks: Blocks, is_end: torch.Tensor, p: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks [N] of the two noisy copies.

    Eligible = not the first token of its block and not ``<|im_end|>`` (``is_end`` [N]). Copy A
    masks eligible tokens with probability p[block]; copy B masks exactly the other eligible
    ones. ``<|im_end|>`` is masked in both copies unless it starts its block (then it is visible).
    """
    first = blocks.positions == blocks.block_start
    eligible = ~first & ~is_end
    u = torch.rand(blocks.positions.shape[0], generator=generator)
    a = eligible & (u < p[blocks.block_index])
    b = eligible & ~a
    forced = is_end & ~first
    return a | forced, b | forced


def shifted_noisy_labels(tokens: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Labels [N] of one noisy copy (target ``tokens`` [N]) with token shift: label[i-1] = token i
    when i is masked. A masked token is never the first of its block, so i - 1 is in the same block.
    """
    labels = torch.full_like(tokens, IGNORE)
    idx = masked.nonzero().flatten()
    labels[idx - 1] = tokens[idx]
    return labels


def clean_labels(clean_ids: torch.Tensor, labels_mask: torch.Tensor) -> torch.Tensor:
    """Causal labels [T]: label[t] = token t+1 when t+1 is an assistant (supervised) token."""
    labels = torch.full_like(clean_ids, IGNORE)
    labels[:-1] = torch.where(labels_mask[1:], clean_ids[1:], torch.full_like(clean_ids[1:], IGNORE))
    return labels


@dataclass
class Example:
    """One laid-out training sample (unpadded)."""

    token_ids: torch.Tensor  # [L] noisy A | noisy B | clean ids (mask id at masked noisy tokens)
    positions: torch.Tensor  # [3, L] M-RoPE positions (noisy tokens copy their clean twin's)
    attention: torch.Tensor  # [L, L] bool
    labels: torch.Tensor  # [L] target ids or IGNORE
    is_noisy: torch.Tensor  # [L] bool
    num_noisy: int
    clean_len: int


def build_example(
    clean_ids: torch.Tensor,
    clean_positions: torch.Tensor,
    labels_mask: torch.Tensor,
    turn_ids: torch.Tensor,
    *,
    block_size: int | None,
    mask_id: int,
    end_id: int,
    generator: torch.Generator | None = None,
    random_offset: bool = False,
    pad_tail: bool = False,
    pad_id: int | None = None,
    eps: float = EPS,
) -> Example:
    """Lay out one sample. ``block_size=None`` gives the AR-only layout (clean stream only).

    ``pad_tail`` fills the last block of the conversation (after the final ``<|im_end|>``) up to
    ``block_size`` with always-masked ``pad_id`` targets at the following positions, as decoding
    sees it: a block of 32 whose answer ends early has masks after the EOS. Only the final turn
    is padded, so no block ever reaches into another turn.
    """
    t = clean_ids.shape[0]
    c_labels = clean_labels(clean_ids, labels_mask)
    if block_size is None:
        return Example(clean_ids, clean_positions, causal_mask(t), c_labels, torch.zeros(t, dtype=torch.bool), 0, t)
    segs = response_segments(turn_ids)
    first_lengths = None
    if random_offset:
        first_lengths = torch.randint(1, block_size + 1, (len(segs),), generator=generator).tolist()
    blocks = auto_truncate_blocks(turn_ids, block_size, first_lengths)
    tokens = clean_ids[blocks.positions]
    pos_noisy = clean_positions[:, blocks.positions]
    is_end = tokens == end_id
    if pad_tail and blocks.positions.numel():
        last = blocks.block_index == blocks.block_index[-1]
        extra = block_size - int(last.sum())
        if extra > 0:
            blocks = Blocks(
                torch.cat([blocks.positions, torch.full((extra,), -1)]),
                torch.cat([blocks.block_start, blocks.block_start[-1:].expand(extra)]),
                torch.cat([blocks.block_index, blocks.block_index[-1:].expand(extra)]),
            )
            tokens = torch.cat([tokens, torch.full((extra,), pad_id, dtype=torch.long)])
            step = torch.arange(1, extra + 1)
            pos_noisy = torch.cat([pos_noisy, pos_noisy[:, -1:] + step[None, :]], dim=1)
            is_end = torch.cat([is_end, torch.ones(extra, dtype=torch.bool)])  # always masked
    n = blocks.positions.shape[0]
    p = noise_levels(blocks.num_blocks, generator, eps)
    mask_a, mask_b = complementary_masks(blocks, is_end, p, generator)
    noisy_a = torch.where(mask_a, torch.full_like(tokens, mask_id), tokens)
    noisy_b = torch.where(mask_b, torch.full_like(tokens, mask_id), tokens)
    nb = blocks.num_blocks
    attention = training_mask(
        t,
        torch.cat([blocks.block_start, blocks.block_start]),
        torch.cat([blocks.block_index, blocks.block_index + nb]),  # the copies never see each other
    )
    return Example(
        token_ids=torch.cat([noisy_a, noisy_b, clean_ids]),
        positions=torch.cat([pos_noisy, pos_noisy, clean_positions], dim=1),
        attention=attention,
        labels=torch.cat([
            shifted_noisy_labels(tokens, mask_a),
            shifted_noisy_labels(tokens, mask_b),
            c_labels,
        ]),
        is_noisy=torch.cat([torch.ones(2 * n, dtype=torch.bool), torch.zeros(t, dtype=torch.bool)]),
        num_noisy=2 * n,
        clean_len=t,
    )


@dataclass
class Batch:
    token_ids: torch.Tensor  # [B, L]
    positions: torch.Tensor  # [3, B, L]
    attention: torch.Tensor  # [B, 1, L, L]
    labels: torch.Tensor  # [B, L]
    is_noisy: torch.Tensor  # [B, L]
    clean_offset: torch.Tensor  # [B] where each row's clean stream starts
    clean_len: torch.Tensor  # [B]


def collate(examples: list[Example], pad_id: int) -> Batch:
    """Right-pad examples; padding rows attend only to themselves (no NaN rows), never attended."""
    b, length = len(examples), max(e.token_ids.shape[0] for e in examples)
    ids = torch.full((b, length), pad_id, dtype=torch.long)
    pos = torch.zeros(3, b, length, dtype=torch.long)
    att = torch.eye(length, dtype=torch.bool).repeat(b, 1, 1, 1)
    labels = torch.full((b, length), IGNORE, dtype=torch.long)
    noisy = torch.zeros(b, length, dtype=torch.bool)
    for i, e in enumerate(examples):
        n = e.token_ids.shape[0]
        ids[i, :n], pos[:, i, :n], labels[i, :n], noisy[i, :n] = e.token_ids, e.positions, e.labels, e.is_noisy
        att[i, 0, :n, :n] = e.attention
    offsets = torch.tensor([e.num_noisy for e in examples])
    lens = torch.tensor([e.clean_len for e in examples])
    return Batch(ids, pos, att, labels, noisy, offsets, lens)


def losses(logits: torch.Tensor, batch: Batch, noisy_weight: float = 0.5, clean_weight: float = 1.0) -> dict:
    """0.5 x mean CE over masked noisy positions + 1.0 x mean AR CE over the clean stream."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    labels = batch.labels.reshape(-1)
    noisy = batch.is_noisy.reshape(-1)
    ce = F.cross_entropy(flat, labels.clamp_min(0), reduction="none")
    valid = labels != IGNORE
    sel_n, sel_c = valid & noisy, valid & ~noisy
    zero = flat.sum() * 0.0
    loss_n = ce[sel_n].mean() if sel_n.any() else zero
    loss_c = ce[sel_c].mean() if sel_c.any() else zero
    total = clean_weight * loss_c + (noisy_weight * loss_n if sel_n.any() else 0.0)
    return {"loss": total, "ar": loss_c.detach(), "diffusion": loss_n.detach()}
