"""Accuracy and decoding speed-up of a checkpoint on a fresh held-out shapes set.

The set is ``shapes.make_split(seed, n)`` with a seed other than the training seed, decoded
greedily one request at a time by the reference decoders (``decoding.generate``), and graded by
exact match (``shapes.answers_match``). Speed is counted in model forwards, not seconds:
``tokens_per_nfe`` = generated tokens / forwards over the whole set (prompt prefills excluded,
final EOS tokens included, as ``GenerationResult.tokens_per_nfe`` counts them), which is what
block diffusion and self-speculation buy over AR independently of the hardware.

    fast-dvlm eval-demo --model demo --algorithm spec --n 200 --seed 1234 --json
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..decoding import ALGORITHMS, GenerationConfig, Prompt, generate
from ..processing import encode_chat
from . import shapes
from .train import TRAIN_SEED

__all__ = ["EvalResult", "MAX_NEW_TOKENS", "evaluate", "run_eval"]

# The longest canonical answer (a description) is under 60 tokens; leave headroom so a rambling
# model is graded wrong rather than cut to a lucky prefix.
MAX_NEW_TOKENS = 160

REPORT_KEYS = ("algorithm", "accuracy", "tokens_per_nfe", "nfe", "n", "avg_answer_tokens", "seconds")


@dataclass(frozen=True)
class EvalResult:
    algorithm: str
    threshold: float
    seed: int
    predictions: tuple[str, ...]
    references: tuple[str, ...]
    kinds: tuple[str, ...]
    tokens: tuple[int, ...]  # generated tokens per sample (final EOS included)
    nfes: tuple[int, ...]  # forwards per sample after the prefill
    seconds: float

    @property
    def correct(self) -> tuple[bool, ...]:
        return tuple(shapes.answers_match(p, r) for p, r in zip(self.predictions, self.references))

    def accuracy_by_kind(self) -> dict[str, float]:
        out: dict[str, list[bool]] = {}
        for kind, ok in zip(self.kinds, self.correct):
            out.setdefault(kind, []).append(ok)
        return {kind: sum(v) / len(v) for kind, v in sorted(out.items())}

    def report(self) -> dict:
        """The summary dict of ``evaluate`` (keys ``REPORT_KEYS``; ``nfe`` is the set's total)."""
        n = len(self.predictions)
        total_tokens, total_nfe = sum(self.tokens), sum(self.nfes)
        return {
            "algorithm": self.algorithm,
            "accuracy": round(sum(self.correct) / n, 4),
            "tokens_per_nfe": round(total_tokens / max(total_nfe, 1), 4),
            "nfe": total_nfe,
            "n": n,
            "avg_answer_tokens": round(total_tokens / n, 2),
            "seconds": round(self.seconds, 2),
        }


def _load(model_dir_or_model, processor):
    """(model, processor) from a directory / ``"demo"`` or from an already loaded model."""
    from ..config import resolve_model_dir
    from ..model import FastDVLMForConditionalGeneration
    from ..tokenizer import load_processor

    if isinstance(model_dir_or_model, (str, Path)):
        model_dir = resolve_model_dir(model_dir_or_model)
        model = FastDVLMForConditionalGeneration.from_pretrained(model_dir)
        return model, processor or load_processor(model_dir)
    if processor is None:
        raise ValueError("pass `processor=` along with a loaded model (a model object has no tokenizer)")
    return model_dir_or_model, processor


def _check_args(algorithm: str, threshold: float, n: int, seed: int) -> None:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if seed == TRAIN_SEED:
        raise ValueError(f"seed {TRAIN_SEED} generates the training split; pick another seed")


def run_eval(
    model_dir_or_model,
    algorithm: str,
    *,
    threshold: float = 0.9,
    n: int = 200,
    seed: int = 1234,
    progress: bool = False,
    processor=None,
) -> EvalResult:
    """Decode the held-out split and keep every prediction (``evaluate`` summarises this)."""
    from tqdm import tqdm

    _check_args(algorithm, threshold, n, seed)
    model, processor = _load(model_dir_or_model, processor)
    config = GenerationConfig(algorithm, max_new_tokens=MAX_NEW_TOKENS, threshold=threshold)
    samples = shapes.make_split(seed, n)
    preds, tokens, nfes = [], [], []
    seconds = 0.0
    for sample in tqdm(samples, desc=f"eval {algorithm}", disable=not progress, mininterval=2):
        enc = encode_chat(processor, sample.prompt_messages)
        prompt = Prompt.from_encoded(enc)
        start = time.perf_counter()  # decoding only: data generation is not the model's time
        with torch.inference_mode():
            result = generate(model, prompt, config, tokenizer=processor.tokenizer)
        seconds += time.perf_counter() - start
        preds.append(result.text)
        tokens.append(len(result.token_ids))
        nfes.append(result.nfe)
    return EvalResult(
        algorithm=algorithm,
        threshold=threshold,
        seed=seed,
        predictions=tuple(preds),
        references=tuple(s.answer for s in samples),
        kinds=tuple(s.kind for s in samples),
        tokens=tuple(tokens),
        nfes=tuple(nfes),
        seconds=seconds,
    )


def evaluate(model_dir_or_model, algorithm: str, **kwargs) -> dict:
    """Summary of ``run_eval`` (same arguments): ``{algorithm, accuracy, tokens_per_nfe, nfe, n,
    avg_answer_tokens, seconds}`` where ``nfe`` is the total number of forwards over the set and
    ``seconds`` the decoding wall time (greedy, batch size 1, the model's device)."""
    return run_eval(model_dir_or_model, algorithm, **kwargs).report()
