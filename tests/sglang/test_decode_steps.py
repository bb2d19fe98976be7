"""A round without drafts runs SGLang DECODE forwards (`sglang_plugin/decode_steps.py`).

The batch of each step is compared, field by field, with the `ForwardBatch` SGLang's own
`ForwardBatch.init_new` builds for that decode step of the same requests (the ScheduleBatch in
the state its AR decode would leave it: one slot per request at the step's position, `seq_lens`
counting it, the step's input tokens; requests whose steps are done filtered out as
`ScheduleBatch.filter_batch` drops them), for text rows and rows with an M-RoPE delta, page
sizes 1 and 4, the first step of a round and later steps of AR runs of several lengths.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.sglang

import torch  # noqa: E402
from test_spec_scheduler import Harness, sgl  # noqa: E402,F401  (the fixture, and SGLang's real pools)

# Fields that may differ, and why: the batch object's planning record (ours is fresh, SGLang's
# a new batch: both unplanned, compared below), the KV plan object (compared through what it
# binds), SGLang's per-forward host mirrors it fills for its own planners.
_NOT_COMPARED = {"kv_loc_plan", "sampling_info", "mm_inputs", "forward_metadata_planned_bs",
                 "forward_metadata_planned_num_tokens"}


def _runner(h, mrope: bool):
    """What `ForwardBatch.init_new` reads of a ModelRunner, with SGLang's real KV translator."""
    from sglang.srt.mem_cache.kv_index_translator import KVIndexTranslator

    translator = KVIndexTranslator(req_to_token=h.pool.req_to_token, token_to_kv_pool_allocator=h.alloc,
                                   token_to_kv_pool=None, page_size=h.page_size, device="cpu")
    return SimpleNamespace(is_draft_worker=False, device="cpu", kv_index_translator=translator,
                           model_config=SimpleNamespace(model_is_mrope=mrope, is_multimodal=mrope,
                                                        is_encoder_decoder=False, requires_mm_token_modalities=False),
                           ngram_embedding_manager=SimpleNamespace(enabled=False), lora_manager=None,
                           prefill_attention_backend_str="torch_native")


def _round_batch(h, widths: list[int]):
    """The DLLM_EXTEND ScheduleBatch of the next round of every live request, `widths` wide
    (SGLang's dLLM lifecycle, as `Harness.step` drives it)."""
    from sglang.srt.managers.schedule_batch import ScheduleBatch
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    from fast_dvlm_sglang.sglang_plugin.draft_length import set_block_width

    for req in h.staging:
        h.sched.finish_dllm_forward(req)
        req.init_next_round_input()
    for req, width in zip(h.reqs, widths):
        req.dllm_algo_state = dataclasses.replace(req.dllm_algo_state, width=width, ar_run=width > 1)
        set_block_width(req, width)
        req.extend_end = len(req.full_untruncated_fill_ids)
    batch = ScheduleBatch.init_new(list(h.reqs), h.pool, h.alloc, h.tree, h.model_config, False,
                                   SpeculativeAlgorithm.NONE, dllm_config=h.dllm_config)
    batch.prepare_for_extend()
    batch.forward_mode = ForwardMode.DLLM_EXTEND
    batch.input_ids, batch.prefill_input_ids_cpu = batch.prefill_input_ids_cpu, None  # resolve_forward_inputs
    return batch


def _mm(delta: int, prompt_len: int):
    """A request's multimodal inputs as the processor leaves them: the prompt's M-RoPE table (ends
    at the prompt) and the delta of the text positions after it."""
    from sglang.srt.managers.schedule_batch import MultimodalInputs

    table = torch.arange(prompt_len).repeat(3, 1)
    return MultimodalInputs(mm_items=[], mrope_positions=table, mrope_position_delta=torch.tensor([[delta]]))


def _same(name, ours, theirs):
    if isinstance(theirs, torch.Tensor) or isinstance(ours, torch.Tensor):
        assert isinstance(ours, torch.Tensor) and isinstance(theirs, torch.Tensor), name
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, (name, ours.dtype, theirs.dtype)
        assert torch.equal(ours, theirs), (name, ours, theirs)
    else:
        assert ours == theirs, (name, ours, theirs)


@pytest.mark.parametrize("page_size", [1, 4])
@pytest.mark.parametrize("mrope", [False, True])
@pytest.mark.parametrize("lengths,step", [([1, 1, 1], 0), ([4, 4, 4], 0), ([4, 4, 4], 2), ([4, 1, 3], 0),
                                          ([4, 1, 3], 2), ([2, 4, 1], 3)])
def test_step_batch_is_sglangs_decode_batch(sgl, page_size, mrope, lengths, step):  # noqa: F811
    """Step `step` of a round whose rows run `lengths` steps: the rows still stepping, as SGLang's
    decode batch of those requests (the others left it, as `ScheduleBatch.filter_batch` leaves them)."""
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

    from fast_dvlm_sglang.sglang_plugin import decode_steps

    h = Harness(page_size, algorithm_config={"draft_length": 0})
    for plen in (3, 9, 6):
        h.add(list(range(1, plen + 1)), max_new_tokens=20)
    assert h.step() == "context"
    runner = _runner(h, mrope)
    batch = _round_batch(h, lengths)
    if mrope:
        batch.multimodal_inputs = [_mm(-5, 3), None, _mm(7, 6)]
    prefix = [r.prefix_len for r in h.reqs]
    stepping = [i for i, n in enumerate(lengths) if n > step]
    tokens = torch.tensor([17, 23, 31], dtype=batch.input_ids.dtype)[stepping]  # the step's inputs

    # Ours: the round's forward batch, then one step of it.
    round_fb = ForwardBatch.init_new(batch, runner, return_hidden_states_before_norm=False)
    starts = torch.tensor([0] + lengths[:-1]).cumsum(0).tolist()
    plan = decode_steps.StepPlan.of(prefix, lengths, starts)
    table = torch.tensor(plan.table)
    at = plan.steps[step]
    assert at.rows == stepping
    rows, slots, pos, seq = (table[a:b] for a, b in at.spans)
    deltas = decode_steps.mrope_deltas(round_fb)
    assert deltas == ([-5, 0, 7] if mrope else None)
    everyone = len(stepping) == len(lengths)
    ours = decode_steps.decode_batch(round_fb, runner, tokens, slots, pos, seq, at.seq_lens,
                                     None if deltas is None else torch.tensor(deltas)[rows],
                                     rows=None if everyone else (rows, at.rows))

    # SGLang's: the stepping requests as its AR decode leaves them for this step.
    batch.filter_batch(keep_indices=stepping)
    seq_lens = torch.tensor([prefix[i] + step + 1 for i in stepping], dtype=batch.seq_lens.dtype)
    batch.forward_mode = ForwardMode.DECODE
    batch.input_ids = tokens
    batch.seq_lens, batch.seq_lens_cpu, batch.orig_seq_lens = seq_lens, seq_lens.cpu(), seq_lens
    batch.seq_lens_sum = None
    batch.out_cache_loc = h.pool.req_to_token[batch.req_pool_indices, seq_lens - 1].to(round_fb.out_cache_loc.dtype)
    batch.prefix_lens = batch.extend_lens = batch.extend_logprob_start_lens = None
    theirs = ForwardBatch.init_new(batch, runner, return_hidden_states_before_norm=False)

    assert ours.forward_mode == ForwardMode.DECODE and ours.needs_forward_metadata_init()
    for f in dataclasses.fields(ForwardBatch):
        if f.name not in _NOT_COMPARED:
            _same(f.name, getattr(ours, f.name), getattr(theirs, f.name))
    assert ours.mm_inputs == theirs.mm_inputs
    plan_ours, plan_theirs = ours.kv_loc_plan, theirs.kv_loc_plan
    _same("plan.seq_lens", plan_ours.seq_lens, plan_theirs.seq_lens)
    _same("plan.write_virtual", plan_ours.write_virtual, plan_theirs.write_virtual)
    assert plan_ours.read_extent == plan_theirs.read_extent
    # the step writes, for each stepping row, the slot its row maps the step's position to
    assert torch.equal(ours.out_cache_loc.long(), h.pool.req_to_token[ours.req_pool_indices,
                                                                      torch.tensor(prefix)[stepping] + step].long())
    assert round_fb.forward_mode == ForwardMode.DLLM_EXTEND  # the round's batch is left as it was


def test_a_step_holds_the_rows_with_steps_left():
    from fast_dvlm_sglang.sglang_plugin.decode_steps import StepPlan

    plan = StepPlan.of([10, 40, 7], [3, 1, 2], [0, 3, 4])
    table = plan.table
    cols = [[table[a:b] for a, b in step.spans] for step in plan.steps]
    assert [step.rows for step in plan.steps] == [[0, 1, 2], [0, 2], [0]]
    assert cols[0] == [[0, 1, 2], [0, 3, 4], [10, 40, 7], [11, 41, 8]]  # rows, slots, positions, seq_lens
    assert cols[1] == [[0, 2], [1, 5], [11, 8], [12, 9]]
    assert cols[2] == [[0], [2], [12], [13]]
    assert [step.seq_lens for step in plan.steps] == [c[3] for c in cols]


@pytest.mark.parametrize("seed", range(3))
def test_a_steps_tokens_are_each_rows_own_ar_choice(seed, monkeypatch):
    """`choose_step` (one step of a round of AR steps, a batch of rows): every row's token is the
    reference AR decoder's choice for it alone (`decoding/ar.py`: its logits adjusted as output
    token `produced + step` after the committed output and the run's earlier steps, then greedy or
    a draw from its own generator), whatever else shares the step: greedy, sampling with shared or
    differing parameters, penalties, min_new_tokens, logit_bias; each generator advances as alone.
    Unseeded rows with equal parameters share one distribution computation; a seeded row never
    shares one (its answer must not depend on the traffic on any device)."""
    import random

    from fast_dvlm_sglang.decoding.sampling import adjust_logits, sample_tokens
    from fast_dvlm_sglang.sglang_plugin import speculative
    from fast_dvlm_sglang.sglang_plugin.speculative import SpecState, choose_step

    draws = []  # the generators of each shared computation
    real = speculative.sample_rows
    monkeypatch.setattr(speculative, "sample_rows", lambda lg, p, gens: draws.append(list(gens)) or real(lg, p, gens))
    shared = 0

    rng = random.Random(seed)
    for _ in range(40):
        vocab, rows, step = rng.choice([5, 64, 700]), rng.randint(1, 10), rng.randint(0, 6)
        states = []
        for _ in range(rows):
            produced = rng.randint(0, 12)
            kw = dict(produced=produced, history=tuple(rng.randrange(vocab) for _ in range(produced)))
            if rng.random() < 0.7:  # a few parameter sets, so that rows share some and differ in others
                kw.update(temperature=rng.choice([0.6, 1.1]), top_p=rng.choice([1.0, 0.85]), top_k=rng.choice([0, 4]),
                          min_p=rng.choice([0.0, 0.1]))
                # seeded (OpenAI `seed`: draws alone) or not (a seed derived from the request id: draws with
                # the rows that share its parameters)
                kw["sampling_seed" if rng.random() < 0.3 else "unseeded_seed"] = rng.randrange(1000)
            if rng.random() < 0.5:
                kw.update(frequency_penalty=rng.choice([0.0, 0.7]), presence_penalty=rng.choice([0.0, 0.4]),
                          repetition_penalty=rng.choice([1.0, 1.5]))
            if rng.random() < 0.3:
                kw.update(min_new_tokens=rng.randint(0, 16), stop_token_ids=(0, 1))
            if rng.random() < 0.3:
                kw.update(logit_bias=((2, 3.0),))
            states.append(SpecState(**kw).with_generator("cpu"))
        logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(rng.randrange(10**6))) * 3
        previous = [torch.tensor([rng.randrange(vocab) for _ in range(step)], dtype=torch.long) for _ in range(rows)]
        alone = [dataclasses.replace(s, generator=None).with_generator("cpu") for s in states]
        draws.clear()
        tokens, adjusted = choose_step(logits, states, step, previous)
        seeded = {id(s.generator) for s in states if s.sampling_seed is not None}
        assert all(len(gens) == 1 for gens in draws if seeded & {id(g) for g in gens})
        shared += sum(len(gens) > 1 for gens in draws)
        for i, s in enumerate(alone):
            params = s.params(vocab)
            row = adjust_logits(logits[i:i + 1], params, s.produced + step, s.stop_token_ids,
                                history=list(s.history) + previous[i].tolist())
            want = int(row.argmax()) if s.greedy else int(sample_tokens(row, params, s.generator)[0])
            assert int(tokens[i]) == want, (vocab, rows, step, i)
            # the adjusted logits its logprobs are read from: for a row with an adjustment at this step
            assert (i in adjusted) == (s.penalizes or bool(s.logit_bias) or s.min_new_tokens > s.produced + step)
            if i in adjusted:
                assert torch.equal(adjusted[i], row)
            if s.generator is not None:
                assert torch.equal(s.generator.get_state(), states[i].generator.get_state())
    assert shared > 0  # the shared computation ran
