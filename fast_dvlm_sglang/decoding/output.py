"""Accumulates a request's committed tokens and applies the stop criteria."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .stopping import StopCriteria, find_stop


class OutputTokens:
    def __init__(self, criteria: StopCriteria, decode: Callable[[Sequence[int]], str] | None) -> None:
        self.criteria = criteria
        self.decode = decode
        self.tokens: list[int] = []
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def remaining(self) -> int:
        return self.criteria.max_new_tokens - len(self.tokens)

    def extend(self, new: Sequence[int]) -> None:
        """Commit `new`; if a stop condition falls inside it, keep only what precedes the cut."""
        self.tokens.extend(int(t) for t in new)
        stop = find_stop(self.tokens, self.criteria, self.decode)
        if stop is not None:
            keep, self.finish_reason = stop
            del self.tokens[keep:]
