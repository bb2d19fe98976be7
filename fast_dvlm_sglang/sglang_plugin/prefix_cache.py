"""SGLang's radix (prefix) cache and chunked prefill for our dLLM algorithms.

Both stay on (SGLang's defaults) for `FastDVLMBlock` and `FastDVLMSpeculative`. Why it is
correct, and the three things we had to add, as hooks listed in `hooks.HOOK_TARGETS`:

What the tree may hold: only causal KV of committed tokens. In both algorithms the KV of the
committed tokens is causal: spec's verify pass writes the KV of every committed token (its
rejected tail is rolled back, `spec_scheduler.rollback_kv`); MDM's bidirectional block KV is
discarded when the block completes and the next causal context pass re-encodes the block
(SGLang's `_stash_dllm_context`). So the prefix a later request matches is exactly the KV an
AR prefill of that prefix would have written (up to the last bits of a different forward shape).

- First-token logits: SGLang never matches a whole prompt (`Req._compute_max_prefix_len`:
  at most `len - 1`, bounded by the block offset and the committed tokens), so every context
  pass computes at least the prompt's last token, whose causal logits give the first answer
  token (spec's seed, MDM's block head).
- Match granularity (`compute_max_prefix_len`, ours): SGLang rounds a dLLM match down to whole
  blocks and sets the page size to the block size (`arg_groups/overrides.py` `_dllm_page_size`)
  because its other dLLM algorithms keep bidirectional block KV; ours never put such KV in the
  tree, so a match is as fine as AR's: any committed prefix, in pages of `--page-size` (default
  1, as AR; SGLang's cap at the block size stays). A five-turn chat computes the same prompt
  tokens under spec and MDM as under AR.
- Inserts while running: after every context pass (and, for MDM, every completed block)
  SGLang's `stash_chunked_request` checkpoints `[0, extend_end)` into the tree. A spec round
  does not (`spec_scheduler.stash_dllm_context`): as an AR decode, the request keeps its
  committed KV in its own row until it finishes, so draft KV never enters the tree. The tree takes
  whole pages only; a page shared between committed and rolled-back tokens stays the request's
  (`cache_protected_len` marks what the tree owns), and a rollback frees only whole pages past
  the committed length, never a page the tree holds (the tree's pages end at or before it).
- Insert at the end (`finish_dllm_request_if_needed`, ours): SGLang releases a finished
  separate-context-encoding request without inserting it (its last block's KV is bidirectional).
  We first cut the KV back to the causal part (`min(kv_committed_len, dllm_block_offset)`: for
  MDM the context before the last block, for spec everything committed) and then release it
  as SGLang's AR path does (`release_kv_cache(checkpoint=True)`), so the next turn of a chat
  hits the prompt and the answer.
- Chunked prefill (`cap_context_budget`, ours): SGLang's dLLM adder budgets a batch of
  context passes with `max_prefill_tokens` only; we cap it at `--chunked-prefill-size` as for
  AR. A cut-short context pass gives no token (spec: `adopt_context_state`; MDM: the last
  chunk's state replaces the earlier ones); the last chunk gives the first token.
- Page size: any page size up to the block size, cache on or off. A block starts right after
  the committed tokens, wherever that falls in a page; spec's rollback frees the whole pages past
  the committed end and keeps the partial page (committed KV followed by rolled-back slots) with
  the request, whose next block fills it (`spec_scheduler.rollback_kv`).

Cached prompt tokens per request are SGLang's `req.cached_tokens` (`meta_info["cached_tokens"]`,
and `usage.prompt_tokens_details.cached_tokens` with `--enable-cache-report`); with
`--enable-metrics` they are also in `fast_dvlm:cached_prompt_tokens` (a histogram, per request).
"""

from __future__ import annotations

from . import metrics


def _ours(scheduler) -> bool:
    from . import ALGORITHM_NAME, SPEC_ALGORITHM_NAME

    cfg = getattr(scheduler, "dllm_config", None)
    return cfg is not None and cfg.algorithm in (ALGORITHM_NAME, SPEC_ALGORITHM_NAME)


def causal_kv_len(req) -> int:
    """KV positions of `req` that hold causal KV of committed tokens."""
    return min(req.kv.kv_committed_len, req.dllm_block_offset)


def release_finished(scheduler, req) -> None:
    """Release a finished request's KV, inserting its causal committed prefix into the tree."""
    from sglang.srt.mem_cache.common import release_kv_cache

    from .spec_scheduler import rollback_kv

    if req.kv.holds_kv:
        keep = causal_kv_len(req)
        if keep < req.kv.kv_allocated_len:
            rollback_kv(req, keep, scheduler.req_to_token_pool, scheduler.token_to_kv_pool_allocator)
    release_kv_cache(req, scheduler.tree_cache, checkpoint=True)
    req.time_stats.set_completion_time()
    if metrics.enabled(scheduler):
        metrics.record_cached_prompt_tokens(int(req.cached_tokens))


# ---- hooks ---------------------------------------------------------------------------------------
def compute_max_prefix_len(original, req, input_len: int) -> int:
    cfg = getattr(req, "dllm_config", None)
    from . import ALGORITHM_NAME, SPEC_ALGORITHM_NAME

    if cfg is None or cfg.algorithm not in (ALGORITHM_NAME, SPEC_ALGORITHM_NAME):
        return original(req, input_len)
    # SGLang's bounds without its whole-block rounding (see the module docstring).
    limit = min(input_len - 1, req.dllm_block_offset, len(req.origin_input_ids) + len(req.output_ids))
    if req.return_logprob and req.logprob_start_len >= 0:
        limit = min(limit, req.logprob_start_len)
    return max(limit, 0)


def dllm_page_size(original, view) -> dict:
    from . import ALGORITHM_NAME, SPEC_ALGORITHM_NAME

    if view.dllm_algorithm not in (ALGORITHM_NAME, SPEC_ALGORITHM_NAME):
        return original(view)
    from sglang.srt.dllm.config import DllmConfig

    block = DllmConfig.from_server_args(view).block_size
    if view.page_size is not None and view.page_size > block:
        return {"page_size": block}  # SGLang's cap, kept
    return {}


def finish_dllm_request_if_needed(original, scheduler, req):
    if not _ours(scheduler):
        return original(scheduler, req)
    from sglang.srt.managers.schedule_batch import FINISH_LENGTH

    from .kv_pressure import next_block_fits_pool

    if not req.finished():
        # SGLang's rule (the model's context length), and ours: the pool's size.
        if (req.seqlen + scheduler.dllm_config.block_size > scheduler.model_config.context_len
                or not next_block_fits_pool(scheduler, req)):
            req.finished_reason = FINISH_LENGTH(length=len(req.output_ids))
    if req.finished():
        release_finished(scheduler, req)
    return None


def cap_context_budget(scheduler, adder) -> None:
    """Chunked prefill: a batch of context passes computes at most --chunked-prefill-size tokens,
    as AR's prefill batches do (SGLang's dLLM adder counts only `max_prefill_tokens`). Called
    by `kv_pressure.process_dllm_batches` for a context-pass batch only: a round batch keeps its
    budget of a block per request."""
    chunk = adder.rem_chunk_tokens
    if chunk is not None and chunk > 0:
        adder.rem_dllm_tokens = min(adder.rem_dllm_tokens, max(chunk, scheduler.dllm_config.block_size))
