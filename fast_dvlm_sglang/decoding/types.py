"""Generation settings and results of the reference decoders."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import DEFAULT_SUB_BLOCK_SIZE
from .draft_policy import DraftPolicy
from .sampling import SamplingParams

ALGORITHMS = ("ar", "mdm", "spec")


@dataclass(frozen=True)
class GenerationConfig:
    algorithm: str = "spec"
    max_new_tokens: int = 256
    block_size: int | None = None  # None: the checkpoint's bd_size
    sub_block_size: int = DEFAULT_SUB_BLOCK_SIZE
    threshold: float = 0.9
    sampling: SamplingParams = field(default_factory=SamplingParams)
    eos_token_ids: tuple[int, ...] | None = None  # None: the checkpoint's EOS ids
    stop_strings: tuple[str, ...] = ()
    draft_policy: DraftPolicy | None = None  # spec: each round's width (None: a whole block)

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {self.algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.block_size is not None and self.block_size < 2:
            raise ValueError(f"block_size must be >= 2, got {self.block_size}")
        if self.sub_block_size < 1:
            raise ValueError(f"sub_block_size must be >= 1, got {self.sub_block_size}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")


@dataclass(frozen=True)
class GenerationResult:
    algorithm: str
    token_ids: list[int]  # generated tokens, including a final EOS token if one ended the answer
    text: str | None
    nfe: int  # model forwards after the prompt prefill
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    accepted_lengths: list[int] = field(default_factory=list)  # spec: draft tokens accepted per round

    @property
    def tokens_per_nfe(self) -> float:
        return len(self.token_ids) / max(self.nfe, 1)
