"""Our dLLM algorithms under KV-pool pressure: requests wait or are retracted, never deadlock.

Why (SGLang 0.5.23, `dllm/mixin/scheduler.py`, separate-context-encoding algorithms): the dLLM
scheduler moves up to `--max-running-requests` requests into its manager's queue, always
schedules context passes (prefills) before block rounds, and its PrefillAdder admits a prompt
truncated to whatever KV is free. Under many long prompts the pool fills with four admitted
prompts plus a slice of a fifth; that slice can never finish, the block rounds of the others
are never scheduled behind it, nothing runs, and the idle check (`Scheduler.on_idle`, which
does not count the manager's queue as busy) raises "pool memory leak detected": the server dies.
AR decoding has the answer (`ScheduleBatch.retract_decode`); the dLLM path has none.

The rule, for `FastDVLMBlock` and `FastDVLMSpeculative` (other algorithms reach SGLang's code
unchanged), as SGLang hooks listed in `hooks.HOOK_TARGETS`:

- admission (`process_dllm_incoming_reqs`): a request's context pass starts only if its whole
  context plus its first block fits in the free (or evictable) KV after reserving one block for
  every request already holding KV; requests are admitted in queue order (no overtaking); a
  request SGLang's adder still refuses goes back to incoming, its prefix match dropped (it was
  never locked; `_undo_refused_match`);
- no starvation (`_process_dllm_batches`): when no context pass can be admitted, the block
  rounds of the requests already running are scheduled instead of nothing;
- retraction (`get_new_batch_dllm`): if nothing at all can be scheduled while requests hold KV,
  the most recently admitted one is retracted as SGLang retracts AR decodes (KV released, state
  reset; its committed output is kept and re-encoded by its next context pass) until a batch
  can run;
- cached prefixes of the requests next in line (`touch_waiting_prefixes`, before each
  scheduling step, only while admitting them would evict): SGLang's AR scheduler keeps the
  prefixes of its waiting queue recent for the LRU eviction (`SchedulePolicy.
  _touch_waiting_prefixes`); the dLLM scheduler moves requests out of that queue into its
  manager's at once, so without this the prompt a queued request shares with others (a system
  prompt) is evicted before its turn and computed again;
- a request that can never fit is refused (`validate_dllm_request`, HTTP 400 naming
  `--max-total-tokens`), and a request is finished with `length` once its next block would not
  fit in the whole pool (`next_block_fits_pool`, applied by `prefix_cache`'s finish hook, as
  SGLang does at the context length).
"""

from __future__ import annotations

import logging
from array import array

logger = logging.getLogger(__name__)


def _ours(scheduler) -> bool:
    from . import ALGORITHM_NAME, SPEC_ALGORITHM_NAME

    cfg = getattr(scheduler, "dllm_config", None)
    return cfg is not None and cfg.algorithm in (ALGORITHM_NAME, SPEC_ALGORITHM_NAME)


def pool_tokens(scheduler) -> int:
    return int(scheduler.max_total_num_tokens)


def free_tokens(scheduler) -> int:
    """KV slots a new allocation can get: free, or held only by the radix tree (evictable)."""
    return int(scheduler.token_to_kv_pool_allocator.available_size()) + int(scheduler.tree_cache.evictable_size())


def _pages(tokens: int, page_size: int) -> int:
    return -(-tokens // page_size) * page_size


def context_tokens(req) -> int:
    """Tokens a request's next context pass encodes: prompt + committed output not in its KV."""
    committed = len(req.origin_input_ids) + len(req.output_ids)
    return committed - (req.kv.kv_committed_len if req.kv.holds_kv else 0)


def admissible(scheduler, reqs: list) -> list:
    """The longest queue-order prefix of `reqs` (incoming context passes) that fits with one
    block of room kept for every request already holding KV."""
    block = scheduler.dllm_config.block_size
    page = scheduler.token_to_kv_pool_allocator.page_size
    holders = sum(1 for r in scheduler.dllm_manager.waiting_queue if r.kv.holds_kv and r not in reqs)
    room = free_tokens(scheduler) - holders * _pages(block, page)
    admitted = []
    for req in reqs:
        need = _pages(context_tokens(req), page) + _pages(block, page)
        if need > room:
            break
        admitted.append(req)
        room -= need
    return admitted


def retract(scheduler, req) -> None:
    """What `ScheduleBatch.retract_decode` does to an AR request, for a dLLM one: KV released (not
    inserted in the tree: the room is needed now), state reset; back to the incoming context
    phase, its committed output kept (the next context pass re-encodes prompt + output)."""
    from sglang.srt.dllm.mixin.req import DllmReqPhase
    from sglang.srt.mem_cache.common import release_kv_cache

    release_kv_cache(req, scheduler.tree_cache, checkpoint=False)
    req.reset_for_retract()
    req.dllm_phase = DllmReqPhase.INCOMING_PREFILL
    req.dllm_incomplete_ids = array("q")
    if isinstance(req.dllm_algo_state, dict):  # FastDVLMBlock: the block restarts from its first token
        req.dllm_algo_state = None
    elif req.dllm_algo_state is not None:  # FastDVLMSpeculative: the seed is re-encoded with the output
        import dataclasses

        req.dllm_algo_state = dataclasses.replace(req.dllm_algo_state, seed=None)
    logger.info("fast_dvlm: retracted request %s (KV pool full: %d of %d tokens free)", req.rid,
                free_tokens(scheduler), pool_tokens(scheduler))


def touch_waiting_prefixes(scheduler) -> None:
    """Make the cached prefixes of the requests waiting for a context pass the most recently used
    in the radix tree, the queue's head last (most recent), as SGLang's AR scheduler does for its
    waiting queue (`SchedulePolicy._touch_waiting_prefixes`, under the same conditions: on by
    `SGLANG_ENABLE_WAITING_PREFIX_REFRESH`, LRU eviction, a tree that shares prefixes).

    Only while the KV pool is under pressure (the waiting contexts plus a block per KV holder
    exceed the free slots: their admission may evict), and only for the head of the queue up to
    `--max-prefill-tokens` of context (what the next batches of context passes can take): the
    walk costs ~40 ns per prompt token on a 2-core CPU, and requests further back are admitted
    only after that much prefill. Every step, not every 32nd as SGLang's AR: matches and inserts
    in between make other nodes more recent. On the shared-prefix load in the README (4 x
    1.5k-token system prompts, 16 in flight, an 8192-token pool; prompt tokens computed over two
    runs) touching every 32nd or 8th step saved nothing (105k, 110k; untouched 105k), every step
    saved 15 to 18% (86k as here, 89.5k without the pressure gate and the budget; AR 87k)."""
    from sglang.srt.environ import envs
    from sglang.srt.mem_cache.common import touch_waiting_prefix
    from sglang.srt.runtime_context import get_memory

    tree = scheduler.tree_cache
    if (not envs.SGLANG_ENABLE_WAITING_PREFIX_REFRESH.get() or not tree.supports_prefix_sharing()
            or get_memory().radix_eviction_policy.lower() != "lru"):
        return
    manager = scheduler.dllm_manager
    waiting = [r for r in manager.waiting_queue if not r.kv.holds_kv and not r.finished()]
    if not waiting:
        return
    block = _pages(scheduler.dllm_config.block_size, scheduler.token_to_kv_pool_allocator.page_size)
    holders = sum(1 for r in manager.waiting_queue if r.kv.holds_kv)
    need = sum(context_tokens(r) for r in waiting) + (holders + len(waiting)) * block
    if need <= scheduler.token_to_kv_pool_allocator.available_size():
        return
    head, budget = [], int(scheduler.max_prefill_tokens)
    for req in waiting:
        budget -= context_tokens(req)
        if budget < 0 and head:
            break
        head.append(req)
    for req in reversed(head):
        touch_waiting_prefix(req, tree)


# ---- hooks ---------------------------------------------------------------------------------------
def validate_dllm_request(original, scheduler, req):
    error = original(scheduler, req)
    if error or not _ours(scheduler):
        return error
    return never_fits_message(len(req.origin_input_ids), scheduler.dllm_config.block_size, pool_tokens(scheduler))


def never_fits_message(prompt_tokens: int, block: int, pool: int) -> str | None:
    """A prompt that with one decoding block can never fit in the KV pool (the HTTP process
    refuses it first, `request_checks.after_validate_one_request`)."""
    if prompt_tokens + block <= pool:
        return None
    return (f"The prompt ({prompt_tokens} tokens) and one decoding block ({block} tokens) do not "
            f"fit in the KV cache of {pool} tokens (--max-total-tokens); shorten the prompt.")


def process_dllm_incoming_reqs(original, scheduler, adder, reqs, running_batch):
    if not _ours(scheduler) or not reqs or not reqs[0].is_dllm_prefill():
        return original(scheduler, adder, reqs, running_batch)
    from sglang.srt.managers.schedule_policy import AddReqResult

    admitted = admissible(scheduler, reqs)
    if not admitted:
        return AddReqResult.NO_TOKEN
    before = {id(r): (r.dllm_phase, r.dllm_initialized) for r in admitted}
    result = original(scheduler, adder, admitted, running_batch)
    taken = {id(r) for r in adder.can_run_list}
    for req in admitted:
        if id(req) not in taken and not req.kv.holds_kv and req.dllm_phase != before[id(req)][0]:
            _undo_refused_match(req, *before[id(req)])
    return result


def _undo_refused_match(req, phase, initialized: bool) -> None:
    """An incoming request the adder refused goes back to what it was before SGLang prepared it.

    SGLang's loop (`SchedulerDllmMixin.process_dllm_incoming_reqs`) runs
    `req.init_next_round_input(tree_cache)` before `adder.add_one_req` may refuse the request
    (NO_TOKEN: the adder reserves each admitted request's max_new_tokens, `admissible` one
    block). The preparation matched a cached prefix (`prefix_len`, `last_node`,
    `kv.cache_protected_len`) and moved the request to STAGING_PREFILL, but the tree lock that
    protects that prefix comes only with admission. Next round the request counted as admitted:
    `add_dllm_staging_req` scheduled it on the stale, unlocked match, whose slots other
    allocations had meanwhile evicted and reused. Its context pass then wrote over another
    request's KV, and its stash inserted those slots into the tree a second time: a gsp load
    (`sglang.bench_serving`, 4 x 1.5k-token shared prefixes, 32 in flight) killed the server
    with "pool memory leak detected ... evictable=10098" over a pool of 8192.
    Restored, the request is matched (and locked when admitted) afresh next time."""
    req.dllm_phase = phase
    req.dllm_initialized = initialized
    req.prefix_len = 0
    req.last_node = None
    req.kv.cache_protected_len = 0
    req.extend_end = None


def process_dllm_batches(original, scheduler, adder, running_batch):
    if not _ours(scheduler):
        return original(scheduler, adder, running_batch)
    from .prefix_cache import cap_context_budget

    round_budget = adder.rem_dllm_tokens
    if scheduler.dllm_manager.get_prefill_requests():  # this batch is context passes
        cap_context_budget(scheduler, adder)
    mode = original(scheduler, adder, running_batch)
    if adder.can_run_list or not mode.is_extend() or mode.is_dllm_extend():
        return mode
    adder.rem_dllm_tokens = round_budget
    # No context pass could start: run the block rounds of the requests already holding KV.
    from sglang.srt.dllm.mixin.req import DllmReqPhase
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    decode_reqs = scheduler.dllm_manager.get_decode_requests()
    if not decode_reqs:
        return mode
    running_batch.batch_is_full = False  # set by the refused admission; it says nothing of rounds
    scheduler._process_batch_by_phase(adder, decode_reqs, DllmReqPhase.STAGING_DECODE,
                                      DllmReqPhase.INCOMING_DECODE, running_batch=running_batch)
    return ForwardMode.DLLM_EXTEND


def get_new_batch_dllm(original, scheduler, running_batch):
    if _ours(scheduler):
        touch_waiting_prefixes(scheduler)
    batch = original(scheduler, running_batch)
    if batch is not None or not _ours(scheduler):
        return batch
    while True:
        manager = scheduler.dllm_manager
        holders = [r for r in manager.waiting_queue if r.kv.holds_kv and not r.finished()]
        if not holders or manager.any_staging_reqs():
            return None
        retract(scheduler, holders[-1])  # the most recently admitted
        batch = original(scheduler, running_batch)
        if batch is not None:
            return batch


def next_block_fits_pool(scheduler, req) -> bool:
    """Whether `req`'s next block fits in the whole pool (else it ends with `length`, as SGLang
    ends a dLLM request at the model's context length; `prefix_cache.finish_dllm_request_if_needed`)."""
    return req.seqlen + scheduler.dllm_config.block_size <= pool_tokens(scheduler)
