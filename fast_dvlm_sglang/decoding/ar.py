"""Autoregressive decoding: one causal forward per token (the baseline and the oracle)."""

from __future__ import annotations

from .output import OutputTokens
from .sampling import adjust_logits, sample_tokens
from .session import DecodeSession


def ar_decode(session: DecodeSession, out: OutputTokens, params, generator, stop_token_ids=()) -> None:
    logits = session.prefill()
    while True:
        logits = adjust_logits(logits, params, len(out.tokens), stop_token_ids, history=out.tokens)
        token = int(sample_tokens(logits, params, generator)[0])
        out.extend([token])
        if out.finished:
            return
        logits = session.forward([token], bidirectional=False, write=True)[-1]
