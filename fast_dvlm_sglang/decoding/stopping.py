"""When a generation ends: EOS ids, stop strings, max_new_tokens."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class StopCriteria:
    max_new_tokens: int
    eos_token_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


def find_stop(
    tokens: Sequence[int], criteria: StopCriteria, decode: Callable[[Sequence[int]], str] | None
) -> tuple[int, str] | None:
    """(number of tokens to keep, finish reason) if `tokens` (all generated so far) must stop.

    EOS: keep up to and including the first EOS. Stop string: keep up to the token that completes
    its first occurrence (the text is trimmed by `visible_text`). Length: keep max_new_tokens.
    """
    eos = next((i for i, t in enumerate(tokens) if t in criteria.eos_token_ids), None)
    limit = len(tokens) if eos is None else eos + 1
    if criteria.stop_strings and decode is not None:
        # Only a stop string that ends inside the new text can be new; check growing prefixes.
        for n in range(1, min(limit, criteria.max_new_tokens) + 1):
            text = decode(tokens[:n])
            if any(s in text for s in criteria.stop_strings):
                return n, "stop"
    if eos is not None and eos < criteria.max_new_tokens:
        return eos + 1, "stop"
    if len(tokens) >= criteria.max_new_tokens:
        return criteria.max_new_tokens, "length"
    return None


def visible_text(text: str, stop_strings: Sequence[str]) -> str:
    """Text shown to the user: cut before the first stop string (OpenAI semantics)."""
    cut = min((text.find(s) for s in stop_strings if s in text), default=-1)
    return text if cut < 0 else text[:cut]
