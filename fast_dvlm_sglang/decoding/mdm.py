"""MDM block decoding (Fast-dLLM v2): the unmasking rule, shared with the SGLang plugin.

Within a block, positions are filled sub-block by sub-block. Each iteration forwards the whole
block block-bidirectionally; with token shift the logits at block position j-1 predict token j.
A step commits every still-masked position of the current sub-block whose confidence exceeds
the threshold, and at least the single most confident one, so every step makes progress.
The mask token itself is never a candidate (`without_mask`): it would be emitted as text.
"""

from __future__ import annotations

import torch


def without_mask(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """A copy of `logits` [..., V] in which the mask token can never be chosen (its logit -inf).

    Committing |<MASK>| would show it in the answer; Fast-dLLM's own loop, which finds the
    positions left to fill by their id, would never end.
    """
    return logits.index_fill(-1, torch.tensor([mask_id], device=logits.device), float("-inf"))


def confidence_unmask(
    confidence: torch.Tensor, is_masked: torch.Tensor, active: torch.Tensor, threshold: float
) -> torch.Tensor:
    """Positions [B, L] to commit this step, given the confidence of each candidate token.

    `active` marks the current sub-block. Rows with no masked active position commit nothing.
    No host synchronisation: everything stays on the tensors' device.
    """
    candidates = is_masked & active
    conf = confidence.masked_fill(~candidates, float("-inf"))
    above = candidates & (conf > threshold)
    best = torch.zeros_like(candidates).scatter_(-1, conf.argmax(dim=-1, keepdim=True), True)
    return above | (best & candidates)


def select_unmask(
    logits: torch.Tensor, is_masked: torch.Tensor, active: torch.Tensor, threshold: float, *, mask_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy form: (argmax tokens [B, L], positions to commit [B, L]) from shifted logits [B, L, V].

    The mask token is excluded before the softmax, so it is neither chosen nor counted in the
    confidence (the reference's `sample_tokens(without_mask(...))` computes the same numbers).
    """
    conf, tokens = torch.softmax(without_mask(logits.float(), mask_id), dim=-1).max(dim=-1)
    return tokens, confidence_unmask(conf, is_masked, active, threshold)


def shift_logits(block_logits: torch.Tensor) -> torch.Tensor:
    """Token shift: out[..., j, :] = block_logits[..., j - 1, :]; position 0 (known) gets a copy of
    position 0 that is never used, since the first token of a block is never masked."""
    return torch.cat([block_logits[..., :1, :], block_logits[..., :-1, :]], dim=-2)


def sub_block_active(length: int, sub_block: int, index: int, device=None) -> torch.Tensor:
    pos = torch.arange(length, device=device)
    return (pos >= index * sub_block) & (pos < (index + 1) * sub_block)


def mdm_decode(session, out, params, generator, *, block_size: int, sub_block_size: int, threshold: float, mask_id: int) -> None:
    """Reference MDM loop over one request (see the module docstring). `logit_bias` is added to
    every position's logits (the first token's and each denoising step's).

    The first token of every block comes from causal logits (the prompt prefill, then each
    block's KV-write forward), exactly as an AR step would produce it; the diffusion iterations
    fill the other block_size - 1 positions. Every block is a full `block_size` canvas, also the
    last one (a shorter last block would change what the filled positions become: they attend to
    the masked tail bidirectionally), and is cut at max_new_tokens or a stop; `out` applies that
    cut. The SGLang plugin lays out its blocks the same way.

    NFE (`session.nfe`) counts every forward this loop runs after the prefill: each diffusion
    iteration and each block's KV write (none after the last block). Denoising stops as soon as
    the filled prefix of a block decides the output (`_ends_inside`); the server does the same
    for stop tokens and max_new_tokens (`sglang_plugin/mdm_scheduler.py`; its
    `meta_info["dllm_nfe"]` equals this count) and, with `--mdm-full-blocks`, completes every block.
    """
    from .sampling import adjust_logits, sample_tokens

    def biased(x):  # `logit_bias`, the same at every position (no output counts: mdm refuses those)
        return adjust_logits(x, params, 0) if params.logit_bias else x

    device = session.model.device
    logits = session.prefill()
    while True:
        first = sample_tokens(without_mask(biased(logits), mask_id), params, generator)[0]
        block = torch.full((block_size,), mask_id, dtype=torch.long, device=device)
        block[0] = first
        masked = torch.ones(block_size, dtype=torch.bool, device=device)
        masked[0] = False
        for index in range(-(-block_size // sub_block_size)):
            active = sub_block_active(block_size, sub_block_size, index, device=device)
            while bool((masked & active).any()):
                if _ends_inside(block, masked, out):
                    return
                block_logits = session.forward(block, bidirectional=True, write=False)
                tokens, conf = sample_tokens(without_mask(biased(shift_logits(block_logits)), mask_id), params,
                                             generator)
                commit = confidence_unmask(conf[None], masked[None], active[None], threshold)[0]
                block = torch.where(commit, tokens, block)
                masked &= ~commit
        out.extend(block.tolist())
        if out.finished:
            return
        logits = session.forward(block, bidirectional=False, write=True)[-1]


def _ends_inside(block: torch.Tensor, masked: torch.Tensor, out) -> bool:
    """If the filled prefix of the block already decides where the output stops (an EOS or stop
    string in it, or it reaches max_new_tokens), commit it and end: nothing after that cut is shown.

    The tokens are exactly those of the whole block decoded and then cut: committed positions
    never change, and `find_stop` is prefix-stable (once a sequence stops, every extension of it
    stops at the same place for the same reason: it scans positions in order and never looks
    past the first EOS or max_new_tokens).
    """
    from .stopping import find_stop

    filled = int((~masked).long().cumprod(0).sum())
    prefix = block[:filled].tolist()
    if find_stop(out.tokens + prefix, out.criteria, out.decode) is None:
        return False
    out.extend(prefix)
    return out.finished
