"""Speculative-decoding counters in SGLang's Prometheus output (`/metrics`, `--enable-metrics`).

SGLang's own `sglang:spec_accept_length` is filled only for its `--speculative-algorithm` workers,
and a dLLM round is reported as a prefill batch, so `FastDVLMSpeculative` exports its own series
from the scheduler process. SGLang runs prometheus_client in multiprocess mode, so series created
here are merged into the server's `/metrics` next to SGLang's:

- `fast_dvlm:spec_rounds_total`: draft/verify rounds, counted per request;
- `fast_dvlm:spec_accepted_drafts_total`: accepted draft tokens (accepted length per round =
  accepted_drafts / rounds);
- `fast_dvlm:spec_tokens_total`: tokens emitted;
- `fast_dvlm:spec_forwards_total`: model forwards per request after the prompt's prefill (NFE;
  tokens/NFE = spec_tokens_total / spec_forwards_total, the per-request `meta_info["dllm_nfe"]`
  summed);
- `fast_dvlm:spec_round_tokens`: histogram of the tokens a round emits (1 .. block_size + 1);
- `fast_dvlm:spec_draft_length`: histogram of the draft length k a round ran with, per request
  (0: an AR step, or an AR run; `draft_length.py` chooses it);
- `fast_dvlm:spec_ar_run_length`: histogram of the AR steps a round ran for a request that drafted
  nothing (1: a single AR step; more: an AR run, `decoding/draft_policy.py`);
- `fast_dvlm:mdm_forwards_total`: `FastDVLMBlock` forwards per request after the prompt's prefill
  (each denoising forward, each re-encoding of a completed block; the per-request
  `meta_info["dllm_nfe"]` summed): tokens/NFE = completion tokens / mdm_forwards_total;
- `fast_dvlm:vision_encoder_images_total`: images the vision tower encoded (an image whose
  tokens come from the radix cache is not encoded again);
- `fast_dvlm:cached_prompt_tokens`: histogram of the prompt tokens a request found in the radix
  cache (SGLang's `req.cached_tokens`), for `FastDVLMBlock` and `FastDVLMSpeculative`.
"""

from __future__ import annotations

import os
from functools import cache

PREFIX = "fast_dvlm:spec_"
# Per-request `meta_info` key (SGLang's `req.customized_info` channel), both algorithms: the
# request's forwards after its prompt's prefill, per output token.
METRIC_NFE = "dllm_nfe"


@cache
def _series(block_size: int):
    from prometheus_client import Counter, Histogram  # after SGLang set PROMETHEUS_MULTIPROC_DIR

    return (
        Counter(PREFIX + "rounds", "Draft/verify rounds, per request"),
        Counter(PREFIX + "accepted_drafts", "Accepted draft tokens"),
        Counter(PREFIX + "tokens", "Tokens emitted by FastDVLMSpeculative"),
        Counter(PREFIX + "forwards", "Model forwards per request after the prompt's prefill (NFE)"),
        Histogram(PREFIX + "round_tokens", "Tokens emitted per round",
                  buckets=[float(b) for b in range(1, block_size + 2)]),
        Histogram(PREFIX + "draft_length", "Draft tokens per round and request (0: an AR step)",
                  buckets=[float(b) for b in range(0, block_size)]),
        Histogram(PREFIX + "ar_run_length", "AR steps per round and request, in rounds that drafted nothing",
                  buckets=[float(b) for b in range(1, block_size + 1)]),
    )


def enabled(scheduler) -> bool:
    reporter = getattr(scheduler, "metrics_reporter", None)
    return bool(getattr(reporter, "enable_metrics", False))


def record(block_size: int, *, rounds: int, accepted_drafts: int, tokens: int, forwards: int,
           draft_length: int = 0, ar_steps: int = 0) -> None:
    """One request's progress in one scheduler step (a round, or a context pass that ended it);
    `ar_steps`: the AR steps of a round that drafted nothing (0: it drafted)."""
    rounds_c, drafts_c, tokens_c, forwards_c, per_round, draft_lengths, ar_runs = _series(block_size)
    rounds_c.inc(rounds)
    drafts_c.inc(accepted_drafts)
    tokens_c.inc(tokens)
    forwards_c.inc(forwards)
    if rounds:
        per_round.observe(tokens)
        draft_lengths.observe(draft_length)
        if ar_steps:
            ar_runs.observe(ar_steps)


@cache
def _mdm_forwards():
    from prometheus_client import Counter

    return Counter("fast_dvlm:mdm_forwards", "FastDVLMBlock forwards per request after the prompt's prefill (NFE)")


def record_mdm_forwards(n: int) -> None:
    if n:
        _mdm_forwards().inc(n)


CACHED_TOKEN_BUCKETS = [0.0] + [float(2 ** i) for i in range(5, 18)]  # 0, 32 .. 128k


@cache
def _cached_prompt_tokens():
    from prometheus_client import Histogram

    return Histogram("fast_dvlm:cached_prompt_tokens", "Prompt tokens found in the radix cache, per request",
                     buckets=CACHED_TOKEN_BUCKETS)


def record_cached_prompt_tokens(tokens: int) -> None:
    _cached_prompt_tokens().observe(tokens)


@cache
def _vision_images():
    from prometheus_client import Counter

    return Counter("fast_dvlm:vision_encoder_images", "Images encoded by the vision tower")


def record_vision_images(n: int) -> None:
    """Called by the model (scheduler process); a no-op unless SGLang's metrics are on (it sets
    prometheus_client's multiprocess directory only with --enable-metrics)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        _vision_images().inc(n)


@cache
def _vision_videos():
    from prometheus_client import Counter

    return Counter("fast_dvlm:vision_encoder_videos", "Video clips encoded by the vision tower")


def record_vision_videos(n: int) -> None:
    """As `record_vision_images`, for clips."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        _vision_videos().inc(n)
