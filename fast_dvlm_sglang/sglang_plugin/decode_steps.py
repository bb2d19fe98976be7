"""AR steps of a speculative round as SGLang DECODE forwards: a round that drafts nothing.

A round in which no row drafts (every row an AR step, or an AR run of r steps for some rows,
`draft_length.py`) needs, per step, each row's next token given everything before it: exactly
an AR decode step. SGLang's dLLM scheduler still hands the round over as one `DLLM_EXTEND`
batch holding each row's slots (1, or r for a run, allocated by its adder); this module runs
the round's steps over those slots as `ForwardMode.DECODE` forwards, the mode SGLang's own AR
decoding runs:

- step j of row i takes the token at position p_i + j (p_i: the seed's position; step 0 the
  seed, step j the token step j - 1 chose), attends to keys 0 .. p_i + j (`seq_lens` =
  p_i + j + 1: the row's `req_to_token` entries, the committed context and the slots the steps
  before wrote) and writes its KV into the round's slot j of row i (`out_cache_loc`, with its
  own `KVLocPlan`, as `ForwardBatch.init_new` plans a lone decode forward);
- a row shorter than the round (an AR step riding along an AR run, a run capped by its budget)
  leaves the steps after its last one, as a finished request leaves SGLang's decode batch: step
  j holds the rows with more than j steps (`StepPlan`), so a run costs the row-steps it commits;
- each step is SGLang's decode forward of our model (decode attention, last-position logits,
  M-RoPE positions `position + mrope_position_delta` as SGLang's decode computes them), so a
  token chosen here is the token SGLang's AR server computes at that step, bit for bit on the
  same device and backend: not the "32-token verify vs 1-token step" near-tie of a drafting
  round.

Why: an AR step through the dLLM path used to run as a one-token causal `DLLM_EXTEND` forward
(an extend's metadata, positions and attention per row), and an AR run as r causal passes over
all r slots of every row (Jacobi iteration: each pass recomputed every slot, so a pass cost r
tokens per row). A decode step costs what SGLang's AR decode step costs, and a run of r steps
costs r of them plus one round of SGLang's dLLM bookkeeping.

Not used under CUDA graphs (`--spec-cuda-graph`): the captured graphs are `DLLM_EXTEND` graphs of
`block_size` slots per row, and a decode forward through that runner would look for a decode
graph it never captured; there a round of AR steps stays one causal block forward.

`decode_batch` is checked field by field against the `ForwardBatch` SGLang itself builds for
the same requests' decode step (`tests/sglang/test_decode_steps.py`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .model import copy_to_device, mrope_delta

# ForwardBatch fields that describe an extend's token layout: None in a DECODE batch, as
# `ForwardBatch.init_new` leaves them (`extend-mode-only fields are None on decode/idle`).
_EXTEND_ONLY = ("extend_num_tokens", "extend_seq_lens", "extend_prefix_lens", "extend_start_loc",
                "extend_prefix_lens_cpu", "extend_seq_lens_cpu", "extend_logprob_start_lens_cpu",
                "extend_input_logprob_token_ids_gpu", "dllm_prompt_mask", "dllm_input_preparation_state",
                "mm_token_modalities", "input_embeds", "replace_embeds", "replace_positions",
                "req_pool_indices_cpu")


# Per-request host lists of a ForwardBatch (as `ForwardBatch.init_new` takes them from the
# ScheduleBatch's requests): a step of some rows keeps their entries.
_PER_REQUEST_LISTS = ("mm_inputs", "rids", "lora_ids", "top_logprobs_nums", "token_ids_logprobs", "encoder_cached",
                      "encoder_lens_cpu")


def usable(model_runner, forward_batch) -> bool:
    """Decode forwards for a round of AR steps: not through a dLLM graph runner (module
    docstring), nor under DP attention, whose ranks agree on every forward's token counts
    beforehand (`global_num_tokens`, synced for the round's extend batch by the scheduler)."""
    return (getattr(model_runner, "decode_cuda_graph_runner", None) is None
            and getattr(forward_batch, "global_num_tokens_cpu", None) is None)


@dataclass(frozen=True)
class Step:
    """One decode step of a round: the rows still stepping (indices into the round's batch) and
    their `seq_lens` (host values), and where its device columns sit in `StepPlan.table`."""

    rows: list[int]
    seq_lens: list[int]
    spans: tuple[tuple[int, int], ...]  # (rows, slots, positions, seq_lens) as [start, end) of the table


@dataclass(frozen=True)
class StepPlan:
    """The host tables of a round of max(lengths) steps: step j holds the rows with more than j
    steps; for each, the flat index of the slot it writes in the round's batch (its slot j), its
    position and its `seq_lens`. One flat list, copied to the device once per round."""

    table: list[int]
    steps: tuple[Step, ...]

    @classmethod
    def of(cls, prefix_lens: list[int], lengths: list[int], starts: list[int]) -> StepPlan:
        table: list[int] = []
        steps = []
        for j in range(max(lengths)):
            rows = [i for i, n in enumerate(lengths) if n > j]
            seq = [prefix_lens[i] + j + 1 for i in rows]
            spans = []
            for column in (rows, [starts[i] + j for i in rows], [prefix_lens[i] + j for i in rows], seq):
                spans.append((len(table), len(table) + len(column)))
                table.extend(column)
            steps.append(Step(rows, seq, tuple(spans)))
        return cls(table, tuple(steps))


def mrope_deltas(forward_batch) -> list[int] | None:
    """Each row's `mrope_position_delta` (None: the model has no M-RoPE)."""
    if getattr(forward_batch, "mrope_positions", None) is None:
        return None
    mm_inputs = getattr(forward_batch, "mm_inputs", None) or [None] * forward_batch.batch_size
    return [mrope_delta(mm) for mm in mm_inputs]


def decode_batch(forward_batch, model_runner, input_ids: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                 seq_lens: torch.Tensor, seq_lens_host: list[int], deltas: torch.Tensor | None,
                 rows: tuple[torch.Tensor, list[int]] | None = None):
    """The DECODE `ForwardBatch` of one step of the round `forward_batch` (its DLLM_EXTEND batch):
    its requests (`rows`: only these, as (device, host) indices; None: all), one token each
    (`input_ids` at `positions`, written to the round's slots `slots`, flat indices into its
    write window), attending `seq_lens` keys (`seq_lens_host`: the same on the host). `deltas`:
    those rows' M-RoPE deltas on the device (None: no M-RoPE)."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    fb = copy.copy(forward_batch)  # a shallow copy: the round's batch stays as SGLang built it
    fb.forward_mode = ForwardMode.DECODE
    if rows is not None:  # the requests' own fields, for the rows that step
        index, host = rows
        fb.batch_size = len(host)
        fb.req_pool_indices = forward_batch.req_pool_indices[index]
        for name in _PER_REQUEST_LISTS:
            value = getattr(forward_batch, name, None)
            if isinstance(value, list) and len(value) == forward_batch.batch_size:
                setattr(fb, name, [value[i] for i in host])
    dtype = forward_batch.seq_lens.dtype
    fb.input_ids = input_ids
    fb.positions = positions.to(dtype)
    fb.seq_lens = seq_lens.to(dtype)
    fb.orig_seq_lens = fb.seq_lens
    fb.seq_lens_cpu = torch.tensor(seq_lens_host, dtype=getattr(forward_batch.seq_lens_cpu, "dtype", torch.int64))
    fb.seq_lens_sum = sum(seq_lens_host)
    if getattr(fb, "max_seq_len_host", None) is not None:
        fb.max_seq_len_host = max(seq_lens_host)
    # The step's write ids in the scheduler's (virtual) slot space, then its own KV plan, as
    # `ForwardBatch.init_new` binds a lone forward (`translator.own_plan(batch).bind(...)`).
    virtual = getattr(forward_batch, "out_cache_loc_virtual", None)
    fb.out_cache_loc = (forward_batch.out_cache_loc if virtual is None else virtual)[slots]
    translator = getattr(model_runner, "kv_index_translator", None)
    if translator is not None:
        translator.own_plan(fb).bind(fb, translator)
    if deltas is not None:
        fb.mrope_positions = (positions.to(torch.int64) + deltas).unsqueeze(0).repeat(3, 1)
    for name in _EXTEND_ONLY:
        if hasattr(fb, name):
            setattr(fb, name, None)
    if hasattr(fb, "contains_last_prefill_chunk"):
        fb.contains_last_prefill_chunk = False  # set for extends (init_new): a decode ends no prefill
    bs = int(input_ids.shape[0])
    if getattr(fb, "global_num_token_non_padded_cpu", None) is not None:
        fb.global_num_token_non_padded_cpu = bs
    if getattr(fb, "global_num_token_non_padded", None) is not None:
        fb.global_num_token_non_padded = copy_to_device(torch.tensor(bs, dtype=torch.int32), input_ids.device)
    if getattr(fb, "num_token_non_padded", None) is not None:
        fb.num_token_non_padded = copy_to_device(torch.tensor(bs, dtype=torch.int32), input_ids.device)
    # A new batch for the attention backend: plan it (SGLang's marker, `needs_forward_metadata_init`).
    fb.forward_metadata_ready = False
    for name in ("forward_metadata_planned_bs", "forward_metadata_planned_num_tokens"):
        if hasattr(fb, name):
            setattr(fb, name, None)
    fb.forward_metadata_replan_equivalent = False
    return fb
