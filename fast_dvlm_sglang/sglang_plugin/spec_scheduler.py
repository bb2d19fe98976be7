"""The scheduler step of `FastDVLMSpeculative`: variable commits and KV rollback, as SGLang hooks.

SGLang 0.5.23's separate-context-encoding flow (sglang/srt/dllm/mixin/scheduler.py) assumes a
round emits a whole block, discards the block's KV and re-encodes it causally in the next round.
A speculative round instead commits a variable number n = k + 1 of tokens per request (the k
accepted drafts and the next seed; a round of width w drafts w - 1, width 1 is an AR step); the verify pass already wrote the causal KV of the seed and
the drafts. The seed is always the request's last committed token, streamed as soon as it is
known; its KV is written by the next round, whose block starts at it. Three AROUND hooks (listed
in `hooks.HOOK_TARGETS`), active only for `FastDVLMSpeculative` requests (other algorithms reach
SGLang's code unchanged):

- `process_batch_result_dllm`:
  * after the causal context pass: commit each request's seed (`adopt_context_state`: output,
    SGLang's finish checks, streamed at once: spec's first token comes as early as AR's), unless
    the pass was cut short (a chunked context pass: the last chunk's pass brings the seed); a
    request SGLang marked `to_finish` (aborted while queued) finishes here;
  * after a round, for each request `apply_round`: write the n tokens into
    `full_untruncated_fill_ids` / `output_ids` (dropping the block's placeholder tail), run
    SGLang's finish checks (`update_finish_state(new_accepted_len=n)`: EOS / stop token / stop
    string / max_new_tokens inside the committed tokens end the request there through
    `req.finished_len`, as for SGLang's own speculative decoding), and `rollback_kv` the block's
    rejected slots. Finished requests then go through SGLang's `release_kv_cache`
    (`_finish_dllm_request_if_needed`), and every request's new tokens are streamed; the round
    is reported to SGLang's metrics as a decode step (`report_decode_stats`), not a prefill.
- `_stash_dllm_context`: the KV is already rolled back; the next round starts at the new seed
  (`req.prefix_len = extend_end`). Like an AR decode, a running request keeps its committed KV
  in its own `req_to_token` row, and the radix tree gets it when the request finishes
  (`prefix_cache.release_finished`). SGLang's dLLM path instead checkpoints every block into
  the tree (`stash_chunked_request`: an insert of the whole sequence, O(context) per request
  and round); for one-token rounds over a few hundred tokens at 16 requests that cost as much
  on the CPU as the round's forward.
- `Req._init_fill_ids_for_dllm`: SGLang puts the next block at `seqlen`; ours starts at the
  seed, `seqlen - 1` == `prefix_len` (phase STAGING_DECODE: no context pass), `block_size` slots,
  which `draft_length.py` cuts to the round's width before SGLang's adder sizes the batch.

KV rollback, page-size aware: keep positions [0, offset + n); free the whole pages from
ceil((offset + n) / page) * page to the allocated end through the allocator's `free_segment`
(page-aligned start, so every page is freed once). The partial page stays with the request and
the next round's `alloc_extend` fills it first, as SGLang does for its own dLLM blocks
(`SchedulerDllmMixin._stash_dllm_context`). Invariant after every context pass and round, for
every live request: `kv_committed_len == kv_allocated_len == extend_end == prefix_len-to-be ==
seqlen - 1`: the seed, the last committed token, has no KV yet.

What a request asked to get back goes on SGLang's own per-request lists, laid out as its AR path
lays them out: prompt logprobs and the prompt's hidden states from the context pass
(`record_prompt_logprobs`, `record_prompt_hidden_states`), each committed token's output logprob
and hidden state from the forward that produced it (`record_logprobs`, `record_hidden_states`).

Metrics (SGLang's per-token `req.customized_info` channel; native /generate returns them in
`meta_info`, accumulated over stream chunks):
- `meta_info["dllm_spec_round"]`: per output token, the draft/verify rounds run when it was
  emitted: 0 for the first token (the context pass's), r for the accepted drafts and the next
  seed of round r;
- `meta_info["dllm_nfe"]`: per output token, the request's forward passes so far after its
  prompt's prefill (2 per round, 1 for an AR step (a round without drafts), r for an AR run of
  r steps, + 1 per re-encoding context pass after a retraction), the reference decoder's
  `GenerationResult.nfe`; tokens/NFE = completion_tokens / dllm_nfe[-1];
- `meta_info["dllm_draft_length"]`: per output token, the draft length of the round that emitted
  it (0 for the first token, AR steps and AR runs; `draft_length.py` chooses it);
- `meta_info["dllm_ar_steps"]`: per output token, the AR steps of the round that emitted it (0
  for the first token and for drafting rounds, 1 for an AR step, r for an AR run of r steps).
SGLang's own speculative meta_info fields (`spec_accept_length`, ...) are only filled when
SGLang's `--speculative-algorithm` is set, so they stay absent. With `--enable-metrics`, the
server-wide counters are in `/metrics` (`metrics.py`: rounds, accepted drafts, tokens, forwards).
"""

from __future__ import annotations

import dataclasses
import logging

from . import metrics, structured_output
from .draft_length import record_workload, scheduler_policy
from .speculative import ALGORITHM_NAME, SpecState

logger = logging.getLogger(__name__)

METRIC_ROUND = "dllm_spec_round"
METRIC_NFE = metrics.METRIC_NFE
METRIC_DRAFT_LENGTH = "dllm_draft_length"
METRIC_AR_STEPS = "dllm_ar_steps"


def register_algorithm() -> None:
    """Make `--dllm-algorithm FastDVLMSpeculative` resolvable (idempotent); hooks: `hooks.py`."""
    from sglang.srt.dllm.algorithm import algo_name_to_cls

    from .speculative import FastDVLMSpeculative

    algo_name_to_cls.setdefault(ALGORITHM_NAME, FastDVLMSpeculative)


def _ours(scheduler) -> bool:
    cfg = getattr(scheduler, "dllm_config", None)
    return cfg is not None and cfg.algorithm == ALGORITHM_NAME


def budget(req) -> int:
    """Most tokens the next round may commit (the seed included)."""
    return max(int(req.sampling_params.max_new_tokens) - len(req.output_ids), 1)


# ---- the step, on one request ------------------------------------------------------------------
def rollback_kv(req, keep_len: int, req_to_token_pool, allocator) -> int:
    """Keep the request's KV for positions [0, keep_len); free the rest; return the slots freed
    (in allocator units: whole pages from ceil(keep_len / page) * page to the allocated end)."""
    allocated = req.kv.kv_allocated_len
    if not 0 <= keep_len <= allocated:
        raise ValueError(f"cannot keep {keep_len} KV slots of request {req.rid}: {allocated} allocated")
    page = allocator.page_size
    free_start = -(-keep_len // page) * page
    freed = 0
    if free_start < allocated:
        slots = req_to_token_pool.req_to_token[req.kv.req_pool_idx, free_start:allocated]
        allocator.free_segment(slots, start_pos=free_start)
        freed = -(-allocated // page) * page - free_start
    req.kv.kv_committed_len = keep_len
    req.kv.kv_allocated_len = keep_len
    return freed


def apply_round(req, tokens: list[int], state: SpecState, req_to_token_pool, allocator,
                block_size: int, policy=None) -> int:
    """Commit one round's tokens (accepted drafts + the next seed) to `req`; roll back the
    block's KV past the old seed and the accepted drafts; update the request's acceptance
    estimate (`policy`: the `DraftPolicy`, None: keep it).

    Returns the number of KV slots freed. Finish checks are SGLang's own.
    """
    n = len(tokens)
    offset = req.seqlen - 1  # the block's first position: the old seed's
    slots = req.extend_end - offset
    if not 1 <= slots <= block_size:
        raise RuntimeError(f"request {req.rid}: block of {slots} slots at {offset} (block size {block_size})")
    if not 1 <= n <= min(slots, state.width or slots):
        raise ValueError(f"a round of width {state.width or slots} commits 1..{state.width or slots} tokens, "
                         f"got {n} for request {req.rid}")
    fill = req.full_untruncated_fill_ids
    del fill[offset + 1:]
    fill.extend(tokens)
    req.output_ids.extend(tokens)
    if state.grammar_walked is not None:  # before the finish checks, which read the matcher
        # (the walk may have left it terminated by a drafted stop: the rollback undoes that)
        structured_output.commit(req.grammar, state.grammar_walked, n - 1, tokens[-1])
    keep = offset + n  # the old seed and the n - 1 accepted drafts; the new seed has no KV yet
    freed = rollback_kv(req, keep, req_to_token_pool, allocator)
    req.extend_end = keep
    req.dllm_block_offset = keep

    width = state.width or slots  # 0: not chosen, the whole block
    drafted = dataclasses.replace(state, width=width).drafted
    _record_metrics(req, state, n, drafted, 0 if drafted else width)
    record_logprobs(req, state.logprob_rows[:n])

    req.update_finish_state(new_accepted_len=n)
    record_hidden_states(req, state.hidden_rows, n)
    req.spec_verify_ct += 1
    req.spec_num_correct_drafts += accepted_drafts_emitted(req, n) if drafted else 0
    if req.finished():
        req.dllm_algo_state = None
    else:
        acceptance = state.acceptance if policy is None else policy.update(state.acceptance, drafted, n - 1, steps=n)
        req.dllm_algo_state = state.committed(req.output_ids, budget=budget(req), acceptance=acceptance,
                                              ar_run=False)
    return freed


def emitted_this_round(req, n: int) -> int:
    """Tokens of this round's `n` the client gets: all of them, or those through a stop token
    (SGLang's `finished_len` cuts `output_ids` there)."""
    before = len(req.output_ids) - n
    return min(n, len(req.output_ids_through_stop) - before)


def accepted_drafts_emitted(req, n: int) -> int:
    """Accepted drafts that were emitted: a round's tokens are its accepted drafts, then the new
    seed; drafts past a stop token are accepted by verify but never sent, so not counted."""
    return min(n - 1, emitted_this_round(req, n))


def _record_metrics(req, state: SpecState, n: int, drafted: int, ar_steps: int) -> None:
    if req.customized_info is None:
        req.customized_info = {}
    req.customized_info.setdefault(METRIC_ROUND, []).extend([state.rounds] * n)
    req.customized_info.setdefault(METRIC_NFE, []).extend([state.nfe] * n)
    req.customized_info.setdefault(METRIC_DRAFT_LENGTH, []).extend([drafted] * n)
    req.customized_info.setdefault(METRIC_AR_STEPS, []).extend([ar_steps] * n)


def record_prompt_logprobs(scheduler, batch, result) -> None:
    """Prompt logprobs (`logprob_start_len` >= 0, completions' `echo`) of a causal context pass,
    through SGLang's own bookkeeping, as its prefill result does: the pass is an EXTEND forward
    of the prompt, so SGLang's LogitsProcessor has already computed them (from each request's
    `logprob_start_len`; the prefix match stops there, `prefix_cache.py`); a chunked prompt adds
    each chunk's, the last chunk finishes the lists. Every request, logprobs or not, advances the
    cursor into the batch's flat values by its count, as SGLang lays them out."""
    if not batch.return_logprob:
        return
    output = result.logits_output
    starts, lens = result.extend_logprob_start_len_per_req, result.extend_input_len_per_req
    if output is None or output.input_token_logprobs is None or not starts or not lens:
        return
    processor = scheduler.batch_result_processor
    processor.move_logprobs_to_cpu(batch=batch, logits_output=output)  # the one host copy of the pass
    logprobs = processor.logprob_result_processor
    cursor = 0
    for i, req in enumerate(batch.reqs):
        count = logprobs.calculate_num_input_logprobs(req, lens[i], starts[i])
        if count > 0 and req.return_logprob and not req.finished():
            logprobs.add_input_logprob_return_values(i, req, output, cursor, count,
                                                     last_prefill_chunk=req.extend_end == req.dllm_block_offset)
        cursor += count


def record_prompt_hidden_states(scheduler, batch, result) -> None:
    """The prompt's hidden states (`return_hidden_states`) from a causal context pass, laid out as
    SGLang's AR prefill lays them out (`_append_prefill_hidden_states`): True, one entry holding
    a row per prompt position it encoded (past a cached prefix); "last", the last position's row.
    A prompt encoded in several chunks gets every chunk's rows in that one entry (SGLang's AR
    prefill keeps only the last chunk's: its chunk boundaries would decide what a client gets).
    A re-encoding pass (after a retraction, the output already has tokens) adds no prompt entry:
    its tokens' rows were recorded when they were committed, and the next seed's is recorded
    when it is (`adopt_context_state`)."""
    output = result.logits_output
    lens = result.extend_input_len_per_req
    if not batch.return_hidden_states or output is None or output.hidden_states is None or not lens:
        return
    full = scheduler.batch_result_processor._get_prefill_hidden_capture_mode(batch).is_full()
    offset = 0
    for req, n in zip(batch.reqs, lens):
        width = n if full else 1  # LAST capture: one row per request, its last position
        rows = output.hidden_states[offset:offset + width]
        offset += width
        if not req.return_hidden_states or req.finished() or req.output_ids:
            continue
        if req.return_hidden_states == "last":
            req.hidden_states[:] = [rows[-1].tolist()]
        elif not req.hidden_states:
            req.hidden_states.append(rows.tolist())
        else:  # the prompt's next chunk (nothing else is recorded before the first output token)
            req.hidden_states[0].extend(rows.tolist())


def record_hidden_states(req, rows, n: int) -> None:
    """The committed tokens' hidden states (`rows`: one per token, the verify row or decode step
    that produced it) onto `req.hidden_states`, through SGLang's decode bookkeeping (after the
    finish checks: "last" keeps the last token through the stop)."""
    if not req.return_hidden_states or rows is None:
        return
    from sglang.srt.managers.scheduler_components.batch_result_processor import SchedulerBatchResultProcessor

    SchedulerBatchResultProcessor._append_decode_hidden_states(req=req, hidden_states=rows, start=0, accept_len=n)


def record_logprobs(req, rows) -> None:
    """The committed tokens' output logprobs onto SGLang's per-request lists, one entry per output
    token as its AR decode appends them (the output streamer sends them with the tokens). Input
    lists the context pass left unset (no prompt logprobs asked) become empty, as SGLang leaves
    them for a request whose logprob_start_len is past its prompt."""
    if not req.return_logprob or not rows:
        return
    lp = req.logprob
    for name in ("input_token_logprobs_val", "input_token_logprobs_idx", "input_top_logprobs_val",
                 "input_top_logprobs_idx", "input_token_ids_logprobs_val", "input_token_ids_logprobs_idx"):
        if getattr(lp, name) is None:
            setattr(lp, name, [])
    tokens = req.output_ids[len(lp.output_token_logprobs_val):]
    for token, (value, top_values, top_ids, given_values) in zip(tokens, rows):
        lp.output_token_logprobs_val.append(value)
        lp.output_token_logprobs_idx.append(token)
        if lp.top_logprobs_num > 0:
            lp.output_top_logprobs_val.append(top_values)
            lp.output_top_logprobs_idx.append(top_ids)
        if lp.token_ids_logprob is not None:
            lp.output_token_ids_logprobs_val.append(given_values)
            lp.output_token_ids_logprobs_idx.append(list(lp.token_ids_logprob))


def adopt_context_state(req, state) -> bool:
    """After a causal context pass: commit its seed (the next token; SGLang's finish checks run on
    it), unless the pass stopped short of the context's end. The caller releases a request the
    seed finished and streams the rest."""
    if not isinstance(state, SpecState) or req.finished() or req.extend_end != req.dllm_block_offset:
        return False
    reencoded = len(req.output_ids) > 0  # a pass after a retraction: the prompt's entry is not this seed's
    req.output_ids.append(state.seed)
    req.full_untruncated_fill_ids.append(state.seed)
    if structured_output.usable(req.grammar):
        structured_output.commit(req.grammar, 0, 0, state.seed)
    _record_metrics(req, state, 1, 0, 0)
    record_logprobs(req, state.logprob_rows[:1])
    req.update_finish_state(new_accepted_len=1)
    if reencoded:
        record_hidden_states(req, state.hidden_rows, 1)
    req.dllm_algo_state = None if req.finished() else state.committed(req.output_ids, budget=budget(req))
    return True


# ---- hooks -----------------------------------------------------------------------------------------
def process_batch_result_dllm(original, scheduler, batch, result):
    """The scheduler step for `FastDVLMSpeculative` (dispatched from `hooks.py`)."""
    if not batch.forward_mode.is_dllm_extend():
        original(scheduler, batch, result)  # context pass: SGLang only reports prefill stats
        record_prompt_logprobs(scheduler, batch, result)
        record_prompt_hidden_states(scheduler, batch, result)
        states = result.dllm_algo_state or [None] * batch.batch_size()
        streamed = []
        record = metrics.enabled(scheduler)
        for req, state in zip(batch.reqs, states):
            if req.to_finish is not None and not req.finished():
                req.update_finish_state()  # adopts `to_finish`
            elif adopt_context_state(req, state):
                streamed.append(req)
                scheduler.metrics_reporter.num_generated_tokens += 1
                if record:
                    metrics.record(scheduler.dllm_config.block_size, rounds=0, accepted_drafts=0, tokens=1,
                                   forwards=int(state.rounds > 0))
            if req.finished():
                scheduler._finish_dllm_request_if_needed(req)
                if req not in streamed:
                    streamed.append(req)
        if streamed:
            scheduler.output_streamer.stream_output(streamed, batch.return_logprob)
        return None

    if result.copy_done is not None:
        result.copy_done.synchronize()
    block_size = scheduler.dllm_config.block_size
    allocator = scheduler.token_to_kv_pool_allocator
    states = result.dllm_algo_state
    record = metrics.enabled(scheduler)
    policy = scheduler_policy(scheduler)
    reporter = scheduler.metrics_reporter
    generated = 0
    allocator.free_group_begin()
    try:
        for req, tokens, state in zip(batch.reqs, result.next_token_ids, states):
            if req.finished():
                continue  # released elsewhere while the round ran
            nfe = req.dllm_algo_state.nfe
            apply_round(req, list(tokens), state, scheduler.req_to_token_pool, allocator, block_size, policy)
            record_workload(scheduler, policy, state.drafted, len(tokens) - 1)
            emitted = emitted_this_round(req, len(tokens))
            if record:
                drafted = state.drafted
                metrics.record(block_size, rounds=1, accepted_drafts=min(len(tokens) - 1, emitted) if drafted else 0,
                               tokens=emitted, forwards=state.nfe - nfe, draft_length=drafted,
                               ar_steps=0 if drafted else state.width)
            generated += emitted
            scheduler._finish_dllm_request_if_needed(req)
        reporter.num_generated_tokens += generated
        scheduler.output_streamer.stream_output(batch.reqs, batch.return_logprob)
    finally:
        allocator.free_group_end()
    # A round is a decode step of its requests: reported as SGLang reports one
    # (batch_result_processor.py, after a decode batch): a "Decode batch" line with the generation
    # throughput every `decode_log_interval` rounds. SGLang's own dLLM step reports every block as
    # a prefill, which for one-token rounds is a log line per token.
    reporter.forward_ct_decode = (reporter.forward_ct_decode + 1) % (1 << 30)
    reporter.report_decode_stats(result.can_run_cuda_graph, running_batch=batch, num_generated_tokens=generated)
    return None


def stash_dllm_context(original, scheduler, req):
    if not _ours(scheduler):
        return original(scheduler, req)
    kv = req.kv
    if not (kv.kv_committed_len == kv.kv_allocated_len == req.extend_end == req.seqlen - 1):
        raise RuntimeError(
            f"{ALGORITHM_NAME}: request {req.rid} KV not rolled back after its round "
            f"(committed={kv.kv_committed_len}, allocated={kv.kv_allocated_len}, "
            f"extend_end={req.extend_end}, seqlen={req.seqlen})"
        )
    # What `checkpoint_kv_cache` does besides the tree insert (see the module docstring).
    req.prefix_len = req.extend_end
    return None


def init_fill_ids_for_dllm(original, req):
    """The next block of a spec request starts at its seed (the last committed token, no KV yet):
    SGLang's layout puts it after `seqlen`, with `block_size` placeholder slots."""
    initialized = req.dllm_initialized
    original(req)
    state = req.dllm_algo_state
    if isinstance(state, SpecState) and state.grammar is not req.grammar and structured_output.usable(req.grammar):
        # The grammar compiled after admission (SGLang's grammar queue); the rounds need its matcher.
        state = req.dllm_algo_state = dataclasses.replace(state, grammar=req.grammar)
    if initialized and not req.dllm_incomplete_ids and isinstance(state, SpecState) and state.seed is not None:
        req.dllm_block_offset = req.seqlen - 1
        del req.full_untruncated_fill_ids[-1]
