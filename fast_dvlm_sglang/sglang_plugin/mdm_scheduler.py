"""The scheduler side of `FastDVLMBlock` (MDM), one scheduler step at a time.

SGLang's dLLM step (`SchedulerDllmMixin.process_batch_result_dllm`, wrapped by the AROUND hook
in `hooks.py`) commits a block once the algorithm reports it done; around it, per request:

- after a causal context pass, the next block's state goes on the request
  (`req.dllm_algo_state`): its first token (from the pass's last logits), its stop token ids
  (SGLang's `Req._check_token_based_finish` set), the tokens it may still emit and its forwards
  so far (`start_block`); if that first token alone ends the answer (a stop, or the budget's last
  token) it is emitted at once and the request finishes without denoising a block
  (`decided_at_start`), as the reference decoder returns before its block's first forward;
- before SGLang emits a denoised block, the request's forwards so far go on the block's tokens
  (`meta_info["dllm_nfe"]`, SGLang's per-token `req.customized_info` channel, as spec does),
  and with `--enable-metrics` into `fast_dvlm:mdm_forwards_total` (`metrics.py`).

NFE is counted as the reference counts it (`decoding.mdm`): every forward after the prompt's
prefill, i.e. each denoising forward and each causal re-encoding of a completed block (+1 per
re-encoding context pass after a retraction, as for spec).
"""

from __future__ import annotations

import torch

from . import metrics
from .metrics import METRIC_NFE


def stop_token_ids(req) -> list[int]:
    """The token ids that end `req` in SGLang's AR rule (`Req._check_token_based_finish`): none
    with ignore_eos, else its stop_token_ids, its EOS ids and the tokenizer's EOS / extra stops."""
    sp = req.sampling_params
    if sp.ignore_eos:
        return []
    ids = set(sp.stop_token_ids or ()) | set(req.eos_token_ids or ())
    tokenizer = getattr(req, "tokenizer", None)
    if tokenizer is not None:
        if tokenizer.eos_token_id is not None:
            ids.add(int(tokenizer.eos_token_id))
        ids |= set(getattr(tokenizer, "additional_stop_token_ids", None) or ())
    return sorted(ids)


def start_block(req, state: dict, device) -> dict:
    """A causal context pass's state for `req`'s next block: its stops, the tokens it may still
    emit, and its forwards so far (the re-encoding pass counts when the request has output)."""
    sp = req.sampling_params
    earlier = (req.customized_info or {}).get(METRIC_NFE)
    state["nfe"] = (earlier[-1] if earlier else 0) + (1 if req.output_ids else 0)
    if sp.stop_strs or sp.stop_regex_strs:
        state["room"], state["stops"] = None, None  # matched on text after the block: denoise it whole
    else:
        state["room"] = max(int(sp.max_new_tokens) - len(req.output_ids), 1)
        state["stops"] = torch.tensor(stop_token_ids(req), dtype=torch.long, device=device)
    return state


def decided_at_start(req, state: dict) -> bool:
    """The block's first token alone already ends `req` (a stop token, or the last token of its
    budget), after a context pass that reached the context's end: then no denoising forward
    would change what is shown. (A cut-short chunk's token is not the block's.)"""
    if state.get("room") is None or req.finished() or req.extend_end != req.dllm_block_offset:
        return False
    return state["room"] <= 1 or state["first_token"] in stop_token_ids(req)


def emit_first_token(req, state: dict) -> None:
    """Commit the block's first token as the request's last (SGLang's finish checks end it)."""
    record_block_nfe(req, state, 1)
    req.output_ids.append(state["first_token"])
    req.update_finish_state(new_accepted_len=1)
    req.dllm_algo_state = None


def record_block_nfe(req, state: dict, new_tokens: int) -> None:
    """`meta_info["dllm_nfe"]` for the block's tokens, before SGLang streams them."""
    if new_tokens <= 0 or state is None:
        return
    if req.customized_info is None:
        req.customized_info = {}
    req.customized_info.setdefault(METRIC_NFE, []).extend([state["nfe"]] * new_tokens)


def emitted_block_tokens(req, block_size: int) -> int:
    """How many output tokens SGLang's FDFO commit appends for a resolved block of `req` (it
    skips positions that are still prompt)."""
    len_fill, len_input = req.extend_end, len(req.origin_input_ids)
    if len_fill <= len_input:
        return 0
    return min(block_size, len_fill - len_input)


# ---- hook ---------------------------------------------------------------------------------------
def process_batch_result_dllm(original, scheduler, batch, result):
    """The scheduler step for `FastDVLMBlock` (dispatched from `hooks.py`)."""
    states = getattr(result, "dllm_algo_state", None)
    if batch.forward_mode.is_dllm_extend():
        # FastDVLMBlock's denoising step: the forwards behind each block SGLang is about to emit
        # go on its tokens first (SGLang streams them inside its own step).
        # (A resolved row's state is None in the result; the request still carries the same dict,
        # which the step advanced in place.)
        accepted = getattr(result, "accept_length_per_req_cpu", None)
        if metrics.enabled(scheduler):
            metrics.record_mdm_forwards(batch.batch_size())
        if accepted is not None:
            block_size = scheduler.dllm_config.block_size
            for req, n in zip(batch.reqs, accepted):
                if n and isinstance(req.dllm_algo_state, dict):
                    record_block_nfe(req, req.dllm_algo_state, emitted_block_tokens(req, block_size))
        return original(scheduler, batch, result)
    original(scheduler, batch, result)
    # A causal context pass of FastDVLMBlock: each request's next block (its first token, its
    # stops and budget, its forwards so far) goes on the request.
    if states is None:
        return None
    device = scheduler.server_args.device
    stop_early = (scheduler.dllm_config.algorithm_config or {}).get("stop_early", True)
    finished, reencoded = [], 0
    for req, state in zip(batch.reqs, states):
        if state is None:
            continue
        req.dllm_algo_state = start_block(req, state, device)
        reencoded += bool(req.output_ids) and req.extend_end == req.dllm_block_offset
        if stop_early and decided_at_start(req, state):
            # Its first token ends the answer: emitted now, as an AR step would, no block run.
            emit_first_token(req, state)
            scheduler.metrics_reporter.num_generated_tokens += 1
            scheduler._finish_dllm_request_if_needed(req)
            finished.append(req)
    if finished:
        scheduler.output_streamer.stream_output(finished, batch.return_logprob)
    if reencoded and metrics.enabled(scheduler):
        metrics.record_mdm_forwards(reencoded)
    return None
