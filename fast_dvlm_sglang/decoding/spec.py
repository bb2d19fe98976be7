"""Self-speculative linear decoding: the acceptance rule, shared with the SGLang plugin.

A round drafts a whole block in one block-bidirectional pass over [seed, mask, ...] and verifies
it in one causal pass over [seed, draft...]. The verify pass's token at block position j is what
AR decoding would emit after [.., seed, d_1..d_j-1]; so while draft and verify agree, the draft is
exactly the AR continuation. We keep that longest agreeing prefix plus the verify token right
after it, which is why greedy speculative output equals greedy AR output token for token.
"""

from __future__ import annotations

import torch

from .draft_policy import AcceptanceEstimate


def accept_longest_prefix(draft: torch.Tensor, verify: torch.Tensor, draft_len: torch.Tensor | None = None) -> torch.Tensor:
    """Number of leading positions where `draft` [B, L] equals `verify` [B, L] (vectorised).

    `draft_len` [B] limits rows with shorter drafts: positions >= draft_len never count.
    Returns a [B] long tensor on the inputs' device (no host sync).
    """
    agree = draft == verify
    if draft_len is not None:
        pos = torch.arange(draft.shape[-1], device=draft.device)
        agree = agree & (pos[None, :] < draft_len[:, None])
    return agree.long().cumprod(dim=-1).sum(dim=-1)


def committed_tokens(draft: torch.Tensor, verify: torch.Tensor, accepted: torch.Tensor) -> torch.Tensor:
    """Tokens a round commits per row, padded: draft[:k] then verify[k] ([B, L+1], -1 after).

    `verify` [B, L+1] holds the verify pass's token for every draft position plus the bonus one.
    """
    b, length = draft.shape
    pos = torch.arange(length + 1, device=draft.device)[None, :]
    k = accepted[:, None]
    padded_draft = torch.cat([draft, draft.new_full((b, 1), -1)], dim=-1)
    out = torch.where(pos < k, padded_draft, verify)
    return out.masked_fill(pos > k, -1)


def spec_decode(session, out, params, generator, *, block_size: int, mask_id: int, policy=None,
                stop_token_ids=()) -> list[int]:
    """Reference speculative loop over one request; returns the accepted draft length per round.

    Each round is as wide as `policy` (a `draft_policy.DraftPolicy`, as the SGLang plugin runs
    it at batch 1) chooses from the request's acceptance so far; without one, a whole block.

    Draft tokens are always argmax (the draft only proposes). The verify tokens follow the
    request's sampling settings: greedy gives AR greedy exactly; with temperature > 0 each
    emitted token is a sample of the causal distribution given the accepted prefix, i.e. a
    valid AR sample (not the same random stream as `ar`). The logit adjustments (penalties,
    `logit_bias`, `min_new_tokens`) apply to every verify position as AR applies them there (the
    penalties count the output and the drafts before the position), and to the draft's positions
    too (the draft then proposes what the verify pass can accept).
    """
    from .sampling import SamplingParams, adjust_logits, sample_tokens

    greedy = SamplingParams()
    device = session.model.device
    accepted: list[int] = []
    seed = sample_tokens(adjust_logits(session.prefill(), params, 0, stop_token_ids), params, generator)[0].view(1)
    out.extend(seed.tolist())
    estimate = AcceptanceEstimate()
    while not out.finished:
        ar_run = False
        if policy is None:
            length = max(1, min(block_size, out.remaining))
        else:
            length = policy.choose([estimate], [session.cache.length], [out.remaining])[0]
            if length == 1 and params.temperature <= 0:  # (seeded sampling takes single steps, as served)
                length = policy.ar_run([session.cache.length], [out.remaining], [True])
                ar_run = length > 1
        if ar_run:
            # An AR run (`draft_policy.py`): `length` AR steps in one round, each one causal
            # forward of the last token (writing its KV) choosing the next as an AR step does.
            steps: list[int] = []
            for _ in range(length):
                logits = session.forward(seed, bidirectional=False, write=True)
                seed = sample_tokens(adjust_logits(logits, params, len(out.tokens) + len(steps), stop_token_ids,
                                                   history=out.tokens + steps), params, generator)[0].view(1)
                steps.extend(seed.tolist())
            accepted.append(length - 1)
            estimate = policy.update(estimate, 0, length - 1, steps=length)
            out.extend(steps)
            continue
        if length > 1:
            masks = torch.full((length - 1,), mask_id, dtype=torch.long, device=device)
            draft_logits = session.forward(torch.cat([seed, masks]), bidirectional=True, write=False)
            produced = len(out.tokens)  # the seed's successor is output token number `produced`
            # penalties: the draft's own tokens are not known yet, so every position counts the output so far
            draft = sample_tokens(adjust_logits(draft_logits[:-1], params, produced, stop_token_ids,
                                                history=out.tokens), greedy)[0]
        else:
            draft = seed.new_empty(0)
        base = session.cache.length
        verify_logits = session.forward(torch.cat([seed, draft]), bidirectional=False, write=True)
        verify = sample_tokens(adjust_logits(verify_logits, params, len(out.tokens), stop_token_ids,
                                             history=out.tokens, row_tokens=draft), params, generator)[0]
        k = accept_longest_prefix(draft[None], verify[None, :-1])
        new = committed_tokens(draft[None], verify[None], k)[0]
        k = int(k[0])
        session.cache.truncate(base + 1 + k)  # keep the seed and the accepted draft tokens
        accepted.append(k)
        if policy is not None:
            estimate = policy.update(estimate, length - 1, k, steps=k + 1)
        out.extend(new[: k + 1].tolist())
        seed = new[k : k + 1]
    return accepted
