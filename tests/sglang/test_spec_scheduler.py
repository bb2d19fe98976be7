"""FastDVLMSpeculative's round and scheduler step on real SGLang objects, without a model.

The harness drives SGLang's own dLLM request lifecycle (`Req.init_next_round_input`,
`ScheduleBatch.prepare_for_extend` allocating from a real `ReqToTokenPool` and a real
`TokenToKVPoolAllocator` / `PagedTokenToKVPoolAllocator`, `SchedulerDllmMixin`'s hooked
`process_batch_result_dllm` / `finish_dllm_forward` / `_finish_dllm_request_if_needed`,
SGLang's `release_kv_cache`) around our algorithm's `run()`. What it stands in for: the model (a
Markov "language model" whose causal logits are the AR truth and whose bidirectional draft is
right most of the time) and the PrefillAdder's `extend_end` choice (copied from
`schedule_policy.PrefillAdder` for the dLLM paths).

After every step: each live request's KV lengths equal its committed length, the pages it owns
are not in the free list, the free list has no duplicates, and free + owned == pool size. At the
end every request's output equals the AR oracle and the pool is back to its initial free count.
"""

from __future__ import annotations

import dataclasses
import os
from array import array
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.sglang

import torch  # noqa: E402

V = 64  # fake vocabulary
MASK = 63
POOL_TOKENS = 1024


@pytest.fixture(scope="module")
def sgl(tiny_checkpoints):
    """Load the plugin (hooks) and publish a runtime context, once per process."""
    from sglang.srt import runtime_context as rc
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import ServerArgs

    load_plugins()
    try:
        published = rc.get_context().server_args is not None
    except ValueError:  # "Global server args is not set yet!"
        published = False
    if not published:
        sa = ServerArgs(model_path=str(tiny_checkpoints["new"]), device="cpu", attention_backend="torch_native",
                        sampling_backend="pytorch", dtype="float32", disable_cuda_graph=True,
                        dllm_algorithm="FastDVLMSpeculative")
        rc.publish(sa, role="scheduler", ranks=rc.SpawnRanks(world_rank=0))
    return True


# ---- the fake model ------------------------------------------------------------------------------
def nxt(tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """AR truth: the token after `tok` at position `pos` (never the mask id)."""
    return (tok * 5 + pos * 3 + 1) % (V - 1)


def oracle(prompt: list[int], n: int, eos: set[int]) -> list[int]:
    out, tok, pos = [], prompt[-1], len(prompt) - 1
    while len(out) < n:
        tok = int(nxt(torch.tensor(tok), torch.tensor(pos)))
        pos += 1
        out.append(tok)
        if tok in eos:
            break
    return out


class FakeForwardBatch(SimpleNamespace):
    """The ForwardBatch fields our algorithms read, with SGLang's own metadata-planning marker
    (`ForwardBatch.mark_forward_metadata_ready` / `needs_forward_metadata_init`, the real methods)."""

    forward_metadata_ready = False
    forward_metadata_replan_equivalent = False
    input_embeds = None

    def __init__(self, **fields):
        from sglang.srt.model_executor.forward_batch_info import ForwardBatch

        super().__init__(**fields)
        for name in ("mark_forward_metadata_ready", "needs_forward_metadata_init"):  # methods: copies keep them
            setattr(type(self), name, getattr(ForwardBatch, name))


class FakeRunner:
    """`model_runner.forward` of a Markov LM: causal logits are the AR truth; the bidirectional
    draft chains the truth from the seed, wrong where a hash of (seed, position) says so.

    It plans attention metadata as SGLang's runners do (eager_runner.py `_execute_extend`,
    decode_cuda_graph_runner.py `load_batch`: only when `needs_forward_metadata_init()`) and
    counts the plans (`metadata_inits`)."""

    def __init__(self, wrong_every: int = 5, hard_from: int | None = None, req_to_token=None):
        self.hidden = False  # True: every forward captures hidden states, a row [token, position] per input
        self.wrong_every = wrong_every
        self.hard_from = hard_from  # every draft token at this position or later is wrong
        self.req_to_token = req_to_token  # the pool's table: a decode step's KV slots are checked against it
        # (round forward: DLLM_EXTEND or an AR step's DECODE, causal, input shape, ids, tokens per row, DECODE)
        self.calls: list[tuple] = []
        self.metadata_inits = 0

    def forward(self, fb, pp_proxy_tensors=None):
        from fast_dvlm_sglang.sglang_plugin.attention_modes import runs_bidirectional

        if fb.needs_forward_metadata_init():
            self.metadata_inits += 1

        decode = fb.forward_mode.is_decode()
        # A causal DLLM_EXTEND forward (the verify pass), as the model itself decides.
        causal = decode or (fb.forward_mode.is_dllm_extend() and not runs_bidirectional(fb))
        ids, pos = fb.input_ids.clone().long(), fb.positions.long()
        rows = getattr(fb, "extend_seq_lens", None)
        rows = [ids.numel() // fb.batch_size] * fb.batch_size if rows is None else rows.tolist()
        self.calls.append((fb.forward_mode.is_dllm_extend() or decode, causal, tuple(fb.input_ids.shape), ids, rows,
                           decode))
        if decode:
            # SGLang's decode step: one token per row at `positions`, attending `seq_lens` keys
            # (itself the last), its KV written to the slot the request's row maps its position to.
            assert fb.extend_seq_lens is None and fb.extend_prefix_lens_cpu is None
            assert torch.equal(fb.seq_lens.long(), pos + 1) and fb.seq_lens_sum == int(fb.seq_lens_cpu.sum())
            assert torch.equal(fb.seq_lens_cpu.long(), fb.seq_lens.long())
            if self.req_to_token is not None:
                slots = self.req_to_token[fb.req_pool_indices.long(), pos]
                assert torch.equal(fb.out_cache_loc.long(), slots.long()), "a decode step writes another slot"
            logits = torch.nn.functional.one_hot(nxt(ids, pos), V).float() * 10
            return SimpleNamespace(logits_output=SimpleNamespace(next_token_logits=logits,
                                                                 hidden_states=self._hidden(ids, pos)),
                                   can_run_graph=False)
        if not fb.forward_mode.is_dllm_extend():
            ends = torch.cumsum(fb.extend_seq_lens, 0) - 1
            logits = torch.nn.functional.one_hot(nxt(ids[ends], pos[ends]), V).float() * 10
            return SimpleNamespace(logits_output=SimpleNamespace(next_token_logits=logits,
                                                                 hidden_states=self._hidden(ids, pos)),
                                   can_run_graph=False)
        # Rows of any widths (`extend_seq_lens`), at the positions the round laid out.
        assert pos.numel() == ids.numel(), "positions not laid out for this round's rows"
        starts = [0] + torch.tensor(rows).cumsum(0)[:-1].tolist()
        assert pos.tolist() == [p for s, n in zip(pos[starts].tolist(), rows) for p in range(s, s + n)], \
            "a row's positions are not consecutive"
        tgt = torch.empty_like(ids)
        at = 0
        for n in rows:
            row, rpos = ids[at:at + n], pos[at:at + n]
            if causal:
                tgt[at:at + n] = nxt(row, rpos)
            else:
                prev = row[0]
                for j in range(n):
                    true = nxt(prev, rpos[j])
                    wrong = (row[0] * 131 + rpos[j] * 31) % self.wrong_every == 0
                    if self.hard_from is not None:
                        wrong = wrong | (rpos[j] >= self.hard_from)
                    tgt[at + j] = torch.where(wrong, (true + 1) % (V - 1), true)
                    prev = true
            at += n
        logits = torch.nn.functional.one_hot(tgt, V).float() * 10
        return SimpleNamespace(logits_output=SimpleNamespace(full_logits=logits, hidden_states=self._hidden(ids, pos)),
                               can_run_graph=False)

    def _hidden(self, ids, pos):
        """SGLang's FULL capture: a row per input position (here [its token, its position])."""
        return torch.stack([ids.float(), pos.float()], dim=1) if self.hidden else None


class _StagingAdder:
    """`PrefillAdder.add_dllm_staging_req` for a decode-phase request with room: its block is
    whatever the request's fill ids hold past its prefix."""

    def add_dllm_staging_req(self, req):
        from sglang.srt.managers.schedule_policy import AddReqResult

        req.extend_end = len(req.full_untruncated_fill_ids)
        return AddReqResult.CONTINUE


# ---- the harness -----------------------------------------------------------------------------------
class _Recorder:
    def __init__(self):
        self.streamed: list[list[str]] = []
        self.num_generated_tokens = 0

    def stream_output(self, reqs, return_logprob, *args, **kwargs):
        self.streamed.append([r.rid for r in reqs])

    forward_ct_decode = 0

    def report_prefill_stats(self, **kwargs):
        self.prefill_reports = getattr(self, "prefill_reports", 0) + 1

    def report_decode_stats(self, can_run_cuda_graph, running_batch=None, num_generated_tokens=0):
        self.decode_reports = getattr(self, "decode_reports", []) + [num_generated_tokens]


class Harness:
    def __init__(self, page_size: int, block_size: int = 8, context_chunk: int | None = None,
                 wrong_every: int = 5, radix: bool = False, algorithm_config: dict | None = None,
                 hard_from: int | None = None):
        from sglang.srt.disaggregation.utils import DisaggregationMode
        from sglang.srt.dllm.config import DllmConfig
        from sglang.srt.dllm.mixin.scheduler import SchedulerDllmMixin
        from sglang.srt.managers.scheduler import Scheduler
        from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator, TokenToKVPoolAllocator
        from sglang.srt.mem_cache.cache_init_params import CacheInitParams
        from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
        from sglang.srt.mem_cache.unified_cache.components import ComponentType
        from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache
        from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode

        from fast_dvlm_sglang.sglang_plugin.speculative import FastDVLMSpeculative

        self.page_size, self.block_size, self.context_chunk = page_size, block_size, context_chunk
        # Default: whole blocks (`draft_length: block_size - 1`), what most tests below count on;
        # {} is the server's default, the adaptive policy.
        if algorithm_config is None:
            algorithm_config = {"draft_length": block_size - 1}
        self.dllm_config = DllmConfig("FastDVLMSpeculative", algorithm_config, block_size, MASK, 16,
                                      first_done_first_out_mode=True, requires_separate_context_encoding=True)
        self.pool = ReqToTokenPool(size=16, max_context_len=256, device="cpu", enable_memory_saver=False)
        os.environ["SGLANG_DEBUG_MEMORY_POOL"] = "1"  # paged allocator: assert no duplicate pages
        try:
            if page_size == 1:
                self.alloc = TokenToKVPoolAllocator(POOL_TOKENS, torch.float32, "cpu", None, need_sort=False)
            else:
                self.alloc = PagedTokenToKVPoolAllocator(POOL_TOKENS, page_size, torch.float32, "cpu", None,
                                                         need_sort=False)
        finally:
            os.environ.pop("SGLANG_DEBUG_MEMORY_POOL", None)
        self.radix = radix  # SGLang's prefix cache on (the server's default) or off
        self.tree = UnifiedRadixCache(params=CacheInitParams(
            disable=not radix, req_to_token_pool=self.pool, token_to_kv_pool_allocator=self.alloc, page_size=page_size,
            tree_components=(ComponentType.FULL,)))
        self.initial_free = self.alloc.available_size()
        self.model_config = SimpleNamespace(vocab_size=V, is_encoder_decoder=False, context_len=256,
                                            hf_text_config=SimpleNamespace())
        harness = self

        class FakeScheduler(SchedulerDllmMixin):  # SGLang's dLLM scheduler methods, hooked
            stash_chunked_request = Scheduler.stash_chunked_request

            def __init__(self):
                self.dllm_config = harness.dllm_config
                self.req_to_token_pool = harness.pool
                self.token_to_kv_pool_allocator = harness.alloc
                self.max_total_num_tokens = POOL_TOKENS  # Scheduler's pool size (kv_pressure hooks read it)
                self.max_prefill_tokens = 16384  # --max-prefill-tokens (SGLang's default)
                self.tree_cache = harness.tree
                self.model_config = harness.model_config
                self.metrics_reporter = _Recorder()
                self.output_streamer = _Recorder()
                self.disaggregation_mode = DisaggregationMode.NULL
                self.server_args = SimpleNamespace(device="cpu")
                # the server's capture of hidden states (`--enable-return-hidden-states`: FULL)
                self.batch_result_processor = SimpleNamespace(
                    _get_prefill_hidden_capture_mode=lambda batch: CaptureHiddenMode.FULL)
                # what SGLang's admission loop (`process_dllm_incoming_reqs`) reads
                self.enable_priority_preemption = False
                self.truncation_align_size = None

            @property
            def dllm_manager(self):
                return SimpleNamespace(waiting_queue=harness.reqs)

            def get_num_allocatable_reqs(self, running_bs, num_held_rows=0):
                return harness.pool.size

        self.sched = FakeScheduler()
        self.algo = FastDVLMSpeculative(self.dllm_config)
        self.runner = FakeRunner(wrong_every, hard_from, req_to_token=self.pool.req_to_token)
        self.reqs: list = []  # live: in the dLLM manager's queues
        self.staging: list = []  # ran in the last batch
        self.done: list = []
        self.freed_by_round: list[int] = []
        self.forwards_by_round: list[list[bool]] = []

    # -- requests --
    def add(self, prompt: list[int], max_new_tokens: int, eos: set[int] = frozenset(), rid: str | None = None,
            stop: list[str] | None = None, tokenizer=None, return_hidden_states=False, **sampling):
        from sglang.srt.managers.schedule_batch import Req
        from sglang.srt.sampling.sampling_params import SamplingParams

        sp = SamplingParams(max_new_tokens=max_new_tokens, stop=stop, **{"temperature": 0, **sampling})
        sp.normalize(tokenizer)
        req = Req(rid or f"r{len(self.reqs) + len(self.done)}", "", array("q", prompt), sp,
                  dllm_config=self.dllm_config, eos_token_ids=set(eos), vocab_size=V,
                  return_hidden_states=return_hidden_states)
        req.tokenizer = tokenizer
        assert self.algo.validate_request(req) is None
        self.reqs.append(req)
        return req

    def abort(self, req):
        """What `Scheduler.abort_request` does to a dLLM request between rounds."""
        from sglang.srt.mem_cache.common import release_kv_cache

        self.reqs.remove(req)
        if req in self.staging:
            self.staging.remove(req)
        if req.kv.holds_kv:
            release_kv_cache(req, self.tree, checkpoint=False)
        self.done.append(req)

    # -- one scheduler iteration --
    def step(self) -> str | None:
        from sglang.srt.dllm.mixin.req import DllmReqPhase
        from sglang.srt.managers.schedule_batch import ScheduleBatch
        from sglang.srt.model_executor.forward_batch_info import ForwardMode
        from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

        for req in [r for r in self.reqs if r.finished()]:  # DllmManager.filter_finished_reqs
            self.reqs.remove(req)
            self.done.append(req)
        self.staging = [r for r in self.staging if not r.finished()]
        for req in self.staging:  # get_next_batch_to_run -> finish_dllm_forward
            self.sched.finish_dllm_forward(req)
        for req in self.staging:  # DllmManager.init_next_round
            req.init_next_round_input()
        if not self.reqs:
            return None
        prefill = [r for r in self.reqs if r.is_dllm_prefill()]
        batch_reqs = prefill or list(self.reqs)
        for req in batch_reqs:
            if req.dllm_phase in (DllmReqPhase.INCOMING_PREFILL, DllmReqPhase.INCOMING_DECODE):
                req.init_next_round_input(self.tree)  # process_dllm_incoming_reqs
                req.lock = self.tree.lock(req.last_node)  # PrefillAdder._commit_prefill_admission
            if prefill:  # PrefillAdder: the context (or one chunk of it)
                remaining = req.dllm_block_offset - req.prefix_len
                req.extend_end = req.prefix_len + min(remaining, self.context_chunk or remaining)
            else:  # our width hook, then PrefillAdder.add_dllm_staging_req
                assert len(req.full_untruncated_fill_ids) == req.prefix_len + self.block_size
        if not prefill:
            assert self.sched.process_dllm_staging_reqs(_StagingAdder(), batch_reqs).name == "CONTINUE"
        batch = ScheduleBatch.init_new(batch_reqs, self.pool, self.alloc, self.tree, self.model_config, False,
                                       SpeculativeAlgorithm.NONE, dllm_config=self.dllm_config)
        batch.prepare_for_extend()
        mode = ForwardMode.EXTEND if prefill else ForwardMode.DLLM_EXTEND
        batch.forward_mode = mode
        batch.prefill_stats = None
        if prefill:
            positions = torch.cat([torch.arange(r.prefix_len, r.extend_end) for r in batch_reqs])
        else:  # what SGLang lays out for a dLLM batch (forward_batch_info.py): block_size per request
            positions = torch.cat([torch.arange(r.dllm_block_offset, r.dllm_block_offset + self.block_size)
                                   for r in batch_reqs])
        fb = FakeForwardBatch(input_ids=batch.prefill_input_ids_cpu.clone(), positions=positions, forward_mode=mode,
                              batch_size=len(batch_reqs), sampling_info=None, mrope_positions=None,
                              extend_seq_lens=torch.tensor([r.extend_len for r in batch_reqs]),
                              extend_seq_lens_cpu=[r.extend_len for r in batch_reqs],
                              extend_prefix_lens_cpu=[r.prefix_len for r in batch_reqs],
                              req_pool_indices=batch.req_pool_indices, seq_lens=batch.seq_lens,
                              seq_lens_cpu=batch.seq_lens_cpu, out_cache_loc=batch.out_cache_loc)
        free_before = self.alloc.available_size()
        calls_before = len(self.runner.calls)
        out, next_ids, accept, states, graph = self.algo.run(self.runner, fb, [r.dllm_algo_state for r in batch_reqs])
        result = SimpleNamespace(copy_done=None, next_token_ids=next_ids, accept_length_per_req_cpu=accept,
                                 dllm_algo_state=states, can_run_cuda_graph=graph, logits_output=out,
                                 extend_input_len_per_req=[r.extend_len for r in batch_reqs] if prefill else None)
        self.sched.process_batch_result_dllm(batch, result)
        if not prefill:
            self.freed_by_round.append(self.alloc.available_size() - free_before)
            # per round: its forwards, True for each DECODE step (`decode_steps.py`)
            self.forwards_by_round.append([c[5] for c in self.runner.calls[calls_before:]])
        self.staging = list(batch_reqs)
        self.check_invariants()
        return "context" if prefill else "round"

    def run(self, max_steps: int = 10_000, between=None):
        for i in range(max_steps):
            if between is not None:
                between(self, i)
            if self.step() is None:
                return
        raise AssertionError("requests never finished")

    # -- invariants --
    def owned_pages(self, req) -> torch.Tensor:
        n = req.kv.kv_allocated_len
        return torch.unique(self.pool.req_to_token[req.kv.req_pool_idx, :n].long() // self.page_size)

    def tree_pages(self) -> torch.Tensor:
        """Pages the radix tree holds (every node's KV indices)."""
        if not self.radix:
            return torch.empty(0, dtype=torch.long)
        return torch.unique(self.tree.all_values_flatten().long() // self.page_size)

    def check_invariants(self):
        """Every page is exactly one of: free, held by the tree, held by one request alone; a
        request's row past the tree's part (`cache_protected_len`) holds pages no one else has."""
        free = self.alloc.get_all_free_pages().long()
        assert torch.unique(free).numel() == free.numel(), "double free"
        tree = self.tree_pages()
        assert not torch.isin(tree, free).any(), "the tree holds a freed page"
        private_total = 0
        seen = tree
        for req in self.reqs:
            if not req.kv.holds_kv:
                continue
            pages = self.owned_pages(req)
            assert not torch.isin(pages, free).any(), f"{req.rid}: owns a page in the free list"
            kv = req.kv
            private = torch.unique(self.pool.req_to_token[kv.req_pool_idx, kv.cache_protected_len:
                                                          kv.kv_allocated_len].long() // self.page_size)
            assert not torch.isin(private, seen).any(), f"{req.rid}: shares a private page"
            seen = torch.cat([seen, private])
            private_total += private.numel() * self.page_size
            if not req.is_dllm_prefill() and req.dllm_algo_state is not None and req.dllm_algo_state.seed is not None:
                # the seed, the last committed token, has no KV yet
                assert kv.kv_committed_len == kv.kv_allocated_len == req.extend_end == req.seqlen - 1, req.rid
        assert self.alloc.available_size() + tree.numel() * self.page_size + private_total == self.initial_free

    def check_drained(self):
        """No request left: every page is free or an unlocked (evictable) tree page."""
        assert self.tree.protected_size() == 0, "a tree lock leaked"
        assert self.alloc.available_size() + self.tree.evictable_size() == self.initial_free
        assert len(self.pool.free_slots) == self.pool.size


def _ids(req) -> list[int]:
    return list(req.output_ids_through_stop)


# ---- tests ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("page_size", [1, 4])
def test_round_commits_prefix_and_releases_exact_slots(sgl, page_size):
    """One request, block 8: the context pass commits (and streams) the seed; each round commits
    the accepted drafts and the next seed, keeps the prefix slots, frees exactly the whole pages
    after the old seed and accepted drafts, and the next block starts at the new seed."""
    h = Harness(page_size)
    prompt = [5, 9, 17, 33, 2, 40, 8]
    req = h.add(prompt, max_new_tokens=40)
    assert h.step() == "context"
    seed = oracle(prompt, 1, set())[0]
    assert req.dllm_algo_state.seed == seed and req.output_ids == array("q", [seed])
    assert h.sched.output_streamer.streamed == [[req.rid]]  # the first token is out at once
    while not req.finished():
        before_len = req.seqlen
        with_kv = before_len - 1  # everything but the seed
        prefix_slots = h.pool.req_to_token[req.kv.req_pool_idx, :with_kv].clone()
        available_before = h.alloc.available_size()
        width = min(h.block_size, 40 - len(req.output_ids))  # a whole block, unless the budget ends first
        assert h.step() == "round"
        n = req.seqlen - before_len
        assert 1 <= n <= h.block_size
        if req.finished():
            break
        # the committed prefix kept its slots; the block's slots after ceil(keep) are free again
        assert torch.equal(h.pool.req_to_token[req.kv.req_pool_idx, :with_kv], prefix_slots)
        keep = req.seqlen - 1
        assert req.dllm_block_offset == req.extend_end == keep == req.kv.kv_allocated_len
        block = h.pool.req_to_token[req.kv.req_pool_idx, with_kv:with_kv + width].long()
        kept_pages = set((h.pool.req_to_token[req.kv.req_pool_idx, :keep].long() // page_size).tolist())
        block_pages = set((block // page_size).tolist())
        free_now = set(h.alloc.get_all_free_pages().tolist())
        assert block_pages - kept_pages <= free_now and not kept_pages & free_now
        pages = lambda n: -(-n // page_size)  # noqa: E731
        assert available_before - h.alloc.available_size() == (pages(keep) - pages(with_kv)) * page_size
    assert _ids(req) == oracle(prompt, 40, set())
    assert not req.kv.holds_kv and h.alloc.available_size() == h.initial_free
    rounds = req.customized_info["dllm_spec_round"]
    assert rounds[0] == 0 and rounds[1] == 1 and rounds == sorted(rounds) and len(rounds) == 40
    assert req.customized_info["dllm_nfe"] == [2 * r for r in rounds]
    assert sum(1 for _, causal, *_ in h.runner.calls if causal) == rounds[-1]  # one verify per round
    assert max(rounds.count(r) for r in set(rounds)) > 1  # some drafts were accepted


@pytest.mark.parametrize("page_size", [1, 4])
def test_rounds_leave_the_tree_alone_until_the_finish(sgl, page_size):
    """As an AR decode: the context pass puts the prompt in the radix tree; rounds do not touch
    the tree (the committed KV stays in the request's own row: no O(context) insert per request
    and round); the finish inserts prompt + answer, and the next turn of the chat matches both."""
    h = Harness(page_size, radix=True)
    prompt = [5, 9, 17, 33, 2, 40, 8, 11, 3]
    req = h.add(prompt, max_new_tokens=30)
    assert h.step() == "context"
    assert h.step() == "round"  # the context pass's checkpoint runs before the next batch is built
    after_context, protected = h.tree_pages(), req.kv.cache_protected_len
    assert after_context.numel() > 0 and protected <= len(prompt)
    rounds = 1
    while not req.finished():
        assert h.step() == "round"
        rounds += 1
        if not req.finished():
            assert torch.equal(h.tree_pages(), after_context) and req.kv.cache_protected_len == protected
    assert rounds > 1 and _ids(req) == oracle(prompt, 30, set())
    h.run()
    h.check_drained()
    follow = prompt + _ids(req) + [1, 2]
    turn = h.add(follow, 6)
    h.run()
    assert _ids(turn) == oracle(follow, 6, set())
    assert turn.cached_tokens >= (len(prompt) + 30 - 1) // page_size * page_size
    h.check_drained()


class _AdderOutOfTokens:
    """SGLang's `PrefillAdder` refusing every request for want of tokens (it reserves each admitted
    request's max_new_tokens, our `kv_pressure.admissible` one block: it can refuse what ours let
    through)."""

    can_run_list: list = []

    def add_one_req(self, req, has_chunked_req, truncation_align_size):
        from sglang.srt.managers.schedule_policy import AddReqResult

        return AddReqResult.NO_TOKEN


@pytest.mark.parametrize("page_size", [1, 4])
def test_a_request_refused_after_its_prefix_matched_is_matched_afresh(sgl, page_size):
    """SGLang's admission loop matches an incoming request's cached prefix
    (`init_next_round_input`) before its adder may refuse it; the tree lock comes only with
    admission. A refused request must not keep that unlocked match: the tree evicts those pages
    for other requests, and a request run on its stale match computes over their KV and puts the
    pages in the tree twice (`kv_pressure._undo_refused_match`; it killed the server under
    sglang.bench_serving's shared-prefix load). Here: refused after matching a cached prompt, the
    tree evicted, another request given the freed pages; every page stays free, the tree's or one
    request's at every step, and both answers are the oracle's."""
    from sglang.srt.dllm.mixin.req import DllmReqPhase
    from sglang.srt.managers.schedule_policy import AddReqResult

    h = Harness(page_size, radix=True)
    shared = list(range(3, 27))
    first = h.add(shared + [40, 41], max_new_tokens=6)
    h.run()
    h.check_drained()
    req = h.add(shared + [50], max_new_tokens=10)
    running = SimpleNamespace(reqs=[], batch_is_full=False)
    assert h.sched.process_dllm_incoming_reqs(_AdderOutOfTokens(), [req], running) == AddReqResult.NO_TOKEN
    assert first.finished() and req.dllm_phase == DllmReqPhase.INCOMING_PREFILL and not req.kv.holds_kv
    assert h.tree.protected_size() == 0  # refused: nothing locked
    h.tree.evict(_evict_all(h))  # other allocations take the cached pages
    other = h.add([60 + i % 7 for i in range(40)], max_new_tokens=10)
    h.run()  # check_invariants after every step
    assert _ids(req) == oracle(shared + [50], 10, set())
    assert _ids(other) == oracle([60 + i % 7 for i in range(40)], 10, set())
    h.check_drained()


def _cache_prompts(h, prompts: list[list[int]]) -> None:
    """Serve each prompt to the end, one after another: the tree then holds each prompt's path,
    the first the least recently used."""
    for prompt in prompts:
        h.add(prompt, max_new_tokens=4)
        h.run()
    h.check_drained()


def _cached_len(h, prompt: list[int]) -> int:
    from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    return h.tree.match_prefix(MatchPrefixParams(key=RadixKey(array("q", prompt)))).device_prefix_len


def _evict_after_touch(h, cached, queued, free_left: int | None, evict_prompts: int):
    """Queue a request behind each of `queued` (not admitted: no KV), leave `free_left` free KV
    slots (None: the pool as it is), touch the queue's prefixes as before a scheduling step, then
    evict `evict_prompts` prompts' worth of KV as the next allocations would (leaves in LRU order;
    a touched path is split at its prompt's end, its answer's tail a leaf of its own). Returns
    which of `cached` are still in the tree."""
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    from fast_dvlm_sglang.sglang_plugin import kv_pressure

    for prompt in queued:
        h.add(prompt + [61, 62], max_new_tokens=4)
    filler = None
    if free_left is not None:
        filler = h.alloc.alloc(h.alloc.available_size() - free_left)  # the KV of other requests
    kv_pressure.touch_waiting_prefixes(h.sched)
    h.tree.evict(EvictParams(num_tokens=evict_prompts * len(cached[0])))
    if filler is not None:
        h.alloc.free(filler)
    return tuple(_cached_len(h, p) > 0 for p in cached)


def _three_prompts():
    return [[3 + (i * 7 + g * 11) % 50 for i in range(40)] for g in range(3)]


@pytest.mark.parametrize("free_left,enabled,evict_prompts,kept", [
    (20, "1", 1, (True, True, False)),  # pressure: the prompt no queued request needs goes first
    (20, "1", 2, (False, True, False)),  # ... then the queue's tail (prompt 0): the head is touched last
    (None, "1", 1, (False, True, True)),  # room for the queue: nothing touched, plain LRU
    (20, "0", 1, (False, True, True)),  # SGLANG_ENABLE_WAITING_PREFIX_REFRESH=0: nothing touched
    (20, "0", 2, (False, False, True)),
])
def test_prefixes_of_queued_requests_outlive_the_rest_under_pressure(sgl, monkeypatch, free_left, enabled,
                                                                     evict_prompts, kept):
    """SGLang's AR scheduler keeps its waiting queue's cached prefixes recent for the LRU eviction;
    our dLLM requests wait in the dLLM manager's queue instead, so `kv_pressure.
    touch_waiting_prefixes` does it there, head last, while their admission would evict. Three
    prompts cached (0 least recent, 2 most), requests queued behind prompt 1 (the head) then
    prompt 0."""
    monkeypatch.setenv("SGLANG_ENABLE_WAITING_PREFIX_REFRESH", enabled)
    h = Harness(1, radix=True)
    prompts = _three_prompts()
    _cache_prompts(h, prompts)
    assert _evict_after_touch(h, prompts, [prompts[1], prompts[0]], free_left, evict_prompts) == kept


def test_only_the_queue_head_within_the_prefill_budget_is_touched(sgl):
    """The walk costs time per prompt token, so only the requests the next batches of context
    passes can take (`--max-prefill-tokens` of context, at least one request) are touched: with a
    budget for one request, the second queued request's prefix keeps its age and goes first."""
    prompts = _three_prompts()
    for budget, kept in [(50, (True, False, True)), (16384, (True, True, False))]:
        h = Harness(1, radix=True)
        _cache_prompts(h, [prompts[1], prompts[2], prompts[0]])  # prompt 1 least recent
        h.sched.max_prefill_tokens = budget  # 50: one queued request's context (42 tokens)
        assert _evict_after_touch(h, prompts, [prompts[0], prompts[1]], 20, 1) == kept, budget


def test_prefixes_are_touched_before_the_step_allocates(sgl, monkeypatch):
    """The hook on `get_new_batch_dllm` touches before SGLang's step runs (its allocations are
    what evicts), and only for our algorithms."""
    from fast_dvlm_sglang.sglang_plugin import kv_pressure

    h = Harness(1, radix=True)
    events = []
    monkeypatch.setattr(kv_pressure, "touch_waiting_prefixes", lambda scheduler: events.append("touch"))
    assert kv_pressure.get_new_batch_dllm(lambda s, rb: events.append("step") or "batch", h.sched, None) == "batch"
    assert events == ["touch", "step"]
    events.clear()
    h.dllm_config.algorithm = "LowConfidence"  # SGLang's own dLLM algorithms: untouched
    kv_pressure.get_new_batch_dllm(lambda s, rb: events.append("step") or "batch", h.sched, None)
    assert events == ["step"]


def test_rounds_report_as_decode_steps_and_context_passes_as_prefills(sgl):
    """SGLang's stats reporting: each context pass is a prefill report; each round is one decode
    step (SGLang logs a decode line every `decode_log_interval` steps, a prefill line every
    time: one per round would be a log line per token) carrying the tokens the round emitted."""
    import inspect

    from sglang.srt.managers.scheduler_components.metrics_reporter import SchedulerMetricsReporter

    assert list(inspect.signature(SchedulerMetricsReporter.report_decode_stats).parameters) == [
        "self", "can_run_cuda_graph", "running_batch", "num_generated_tokens"]
    h = Harness(1)
    reqs = [h.add(list(range(1, 8)), max_new_tokens=n) for n in (20, 9)]
    kinds = []
    while (kind := h.step()) is not None:
        kinds.append(kind)
    reporter = h.sched.metrics_reporter
    assert reporter.prefill_reports == kinds.count("context") == 1
    assert len(reporter.decode_reports) == reporter.forward_ct_decode == kinds.count("round")
    # every token after the two seeds came from a round, and was counted once
    assert sum(reporter.decode_reports) == sum(len(_ids(r)) for r in reqs) - 2
    assert reporter.num_generated_tokens == sum(len(_ids(r)) for r in reqs)


def test_round_forwards_are_static_draft_then_causal_verify(sgl):
    """Per round: exactly one bidirectional draft over [seed, MASK...] and one causal verify over
    [seed, drafts...], both of shape [bs * block_size], for requests at different offsets."""
    h = Harness(1)
    for plen, n in ((3, 20), (11, 5), (6, 13)):
        h.add(list(range(1, plen + 1)), max_new_tokens=n)
    h.run()
    rounds = [c for c in h.runner.calls if c[0]]
    assert len(rounds) % 2 == 0
    for draft, verify in zip(rounds[::2], rounds[1::2]):
        assert not draft[1] and verify[1]
        assert draft[2] == verify[2] and draft[4] == verify[4] and sum(draft[4]) == draft[2][0]
        starts = [0] + torch.tensor(draft[4]).cumsum(0)[:-1].tolist()
        d, v = draft[3], verify[3]
        is_start = torch.zeros_like(d, dtype=torch.bool)
        is_start[starts] = True
        assert (d[~is_start] == MASK).all() and torch.equal(d[is_start], v[is_start]) and not (v == MASK).any()
    for req in h.done:
        assert _ids(req) == oracle(list(req.origin_input_ids), req.sampling_params.max_new_tokens, set())


def test_budget_caps_commits_and_sets_length_finish(sgl):
    """A round never commits past max_new_tokens; the state's budget follows the output."""
    from sglang.srt.managers.schedule_batch import FINISH_LENGTH

    h = Harness(1, wrong_every=10_000)  # drafts always right: every round wants a full block
    req = h.add([1, 2, 3], max_new_tokens=5)
    h.step()
    assert req.dllm_algo_state.budget == 4 and len(req.output_ids) == 1  # the seed is committed
    h.step()
    assert req.finished() and isinstance(req.finished_reason, FINISH_LENGTH)
    assert _ids(req) == oracle([1, 2, 3], 5, set()) and len(req.output_ids) == 5
    assert h.alloc.available_size() == h.initial_free

    req = h.add([4, 5], max_new_tokens=19)
    h.step()
    h.step()
    assert len(req.output_ids) == 9 and req.dllm_algo_state.budget == 10  # seed + 7 drafts + seed
    h.run()
    assert _ids(req) == oracle([4, 5], 19, set()) and h.alloc.available_size() == h.initial_free


@pytest.mark.parametrize("page_size", [1, 4])
@pytest.mark.parametrize("ends", ["eos", "length"])
def test_a_seed_that_ends_the_request_costs_no_round(sgl, page_size, ends):
    """The reference decoder stops as soon as its next token is EOS or the last of the budget; so
    does the step: that token is committed by the round (or context pass) that chose it, no
    round runs after it, and every slot comes back."""
    from sglang.srt.managers.schedule_batch import FINISH_LENGTH, FINISH_MATCHED_TOKEN

    prompt = [7, 3, 12]
    truth = oracle(prompt, 40, set())
    h = Harness(page_size, wrong_every=10_000)  # drafts always right: round 1 commits truth[1:9]
    cut = h.block_size  # the seed after round 1
    assert truth[cut] not in truth[:cut]
    if ends == "eos":
        req = h.add(prompt, max_new_tokens=40, eos={truth[cut]})
    else:
        req = h.add(prompt, max_new_tokens=cut + 1)
    h.run()
    assert _ids(req) == truth[: cut + 1] and len(req.output_ids) == cut + 1
    assert isinstance(req.finished_reason, FINISH_MATCHED_TOKEN if ends == "eos" else FINISH_LENGTH)
    assert sum(1 for dllm, *_ in h.runner.calls if dllm) == 2  # one round: draft + verify
    assert req.customized_info["dllm_spec_round"] == [0] + [1] * cut
    assert req.customized_info["dllm_nfe"] == [0] + [2] * cut
    assert h.alloc.available_size() == h.initial_free

    # From the context pass: one token asked for, or the first token is EOS.
    h = Harness(page_size)
    one = h.add(prompt, max_new_tokens=1)
    first = h.add([1, 2, 3], max_new_tokens=20, eos={oracle([1, 2, 3], 1, set())[0]})
    h.run()
    assert _ids(one) == truth[:1] and _ids(first) == oracle([1, 2, 3], 1, set())
    assert not any(dllm for dllm, *_ in h.runner.calls)
    assert one.customized_info["dllm_nfe"] == first.customized_info["dllm_nfe"] == [0]
    assert [r for batch in h.sched.output_streamer.streamed for r in batch] == [one.rid, first.rid]
    assert h.alloc.available_size() == h.initial_free

    # Two tokens: the round has no room for a draft token: one causal verify, no draft pass.
    h = Harness(page_size)
    two = [h.add(prompt, max_new_tokens=2), h.add([4, 5, 6, 7, 8], max_new_tokens=2)]
    h.run()
    assert [c[1] for c in h.runner.calls if c[0]] == [True]  # one DLLM forward, causal
    assert _ids(two[0]) == truth[:2] and _ids(two[1]) == oracle([4, 5, 6, 7, 8], 2, set())
    assert two[0].customized_info["dllm_nfe"] == [0, 1]
    assert h.alloc.available_size() == h.initial_free


@pytest.mark.parametrize("page_size", [1, 4])
def test_eos_inside_accepted_prefix_ends_request_there(sgl, page_size):
    """An EOS among the accepted drafts finishes the request at the EOS (later accepted tokens are
    not output) and SGLang's release returns every slot, the overshoot included."""
    from sglang.srt.managers.schedule_batch import FINISH_MATCHED_TOKEN

    prompt = [7, 3, 12]
    truth = oracle(prompt, 40, set())
    h = Harness(page_size, wrong_every=10_000)  # full blocks accepted: the EOS lands mid-round
    eos = truth[4]
    assert eos not in truth[:4]
    req = h.add(prompt, max_new_tokens=40, eos={eos})
    other = h.add([1, 1, 2], max_new_tokens=12)
    h.run()
    assert isinstance(req.finished_reason, FINISH_MATCHED_TOKEN)
    assert _ids(req) == truth[:5] and len(req.output_ids) > 5  # committed past it, reported up to it
    assert req.customized_info["dllm_spec_round"][:5] == [0, 1, 1, 1, 1]
    # SGLang's accepted-draft count (its meta_info / metrics) counts the 4 drafts emitted, not
    # the ones verify accepted past the EOS.
    assert req.spec_num_correct_drafts == 4 == _emitted_drafts(req)
    assert _ids(other) == oracle([1, 1, 2], 12, set())
    assert h.alloc.available_size() == h.initial_free


def test_stop_string_inside_accepted_prefix(sgl):
    """SGLang's stop-string check runs over the whole accepted run (new_accepted_len = n)."""
    from sglang.srt.managers.schedule_batch import FINISH_MATCHED_STR

    class Tok:  # each id decodes to one letter
        eos_token_id = None
        additional_stop_token_ids = None

        def decode(self, ids, **kw):
            return "".join(chr(97 + int(i) % 26) for i in ids)

        def encode(self, text, **kw):
            return [ord(c) - 97 for c in text]

    prompt = [7, 3, 12]
    truth = oracle(prompt, 30, set())
    stop = Tok().decode(truth[3:5])
    first = Tok().decode(truth).find(stop)
    h = Harness(1, wrong_every=10_000)
    req = h.add(prompt, max_new_tokens=30, stop=[stop], tokenizer=Tok())
    h.run()
    assert isinstance(req.finished_reason, FINISH_MATCHED_STR)
    assert _ids(req) == truth[:first + len(stop)]
    assert req.spec_num_correct_drafts == _emitted_drafts(req) < len(req.output_ids)
    assert h.alloc.available_size() == h.initial_free


def _emitted_drafts(req) -> int:
    """Drafts among the emitted tokens: a round emits its accepted drafts and then its new seed,
    unless a stop cut it short (then all it emitted were drafts); the first token is the context
    pass's."""
    emitted = len(_ids(req))
    tags = req.customized_info["dllm_spec_round"][:emitted]
    rounds = sorted(set(tags) - {0})
    cut = len(req.output_ids) > emitted
    return sum(tags.count(r) - 1 for r in rounds) + int(cut and bool(rounds))


def test_abort_between_rounds_and_finish_mid_batch(sgl):
    """Aborting one request between rounds releases its KV through SGLang's release path; a
    request finishing inside a batched round releases its KV while the others keep theirs."""
    h = Harness(4)
    a = h.add([1, 2, 3, 4, 5], max_new_tokens=9)
    b = h.add([9, 8, 7], max_new_tokens=60)
    c = h.add([3, 3], max_new_tokens=60)
    h.step()
    h.step()
    assert all(r.kv.holds_kv for r in (a, b, c))
    held_b = h.owned_pages(b).numel() * h.page_size
    free = h.alloc.available_size()
    h.abort(b)
    assert not b.kv.holds_kv and h.alloc.available_size() == free + held_b
    h.check_invariants()
    while not a.finished():
        h.step()
    assert not a.kv.holds_kv and c.kv.holds_kv and not c.finished()
    h.check_invariants()
    h.run()
    assert _ids(a) == oracle([1, 2, 3, 4, 5], 9, set()) and _ids(c) == oracle([3, 3], 60, set())
    assert h.alloc.available_size() == h.initial_free
    assert len(h.pool.free_slots) == h.pool.size


def test_chunked_context_pass_takes_the_seed_of_the_last_chunk(sgl):
    h = Harness(2, context_chunk=3)
    prompt = list(range(10, 21))
    req = h.add(prompt, max_new_tokens=12)
    kinds = [h.step() for _ in range(4)]
    assert kinds == ["context"] * 4 and req.dllm_algo_state.seed == oracle(prompt, 1, set())[0]
    h.run()
    assert _ids(req) == oracle(prompt, 12, set()) and h.alloc.available_size() == h.initial_free


def test_retracted_request_reencodes_its_output(sgl):
    """After its KV is released (retraction), the request's next context pass covers prompt +
    committed output and decoding continues exactly; its SpecState counters carry over."""
    from sglang.srt.dllm.mixin.req import DllmReqPhase
    from sglang.srt.mem_cache.common import release_kv_cache

    h = Harness(4)
    prompt = [2, 4, 6, 8]
    req = h.add(prompt, max_new_tokens=30)
    for _ in range(3):
        h.step()
    rounds = req.dllm_algo_state.rounds
    assert rounds == 2 and len(req.output_ids) > 0
    release_kv_cache(req, h.tree, checkpoint=False)
    req.reset_for_retract()
    req.dllm_phase = DllmReqPhase.INCOMING_PREFILL  # back in the waiting queue, like a new request
    h.staging.remove(req)
    assert h.step() == "context"
    # the re-encoding covered prompt + output (the old seed included); its new seed is committed
    assert req.dllm_block_offset == len(prompt) + len(req.output_ids) - 1 and req.dllm_algo_state.rounds == rounds
    h.run()
    assert _ids(req) == oracle(prompt, 30, set()) and h.alloc.available_size() == h.initial_free
    nfe = req.customized_info["dllm_nfe"]
    assert nfe[-1] == 1 + 2 * req.customized_info["dllm_spec_round"][-1]  # the re-encoding pass


# ---- hidden states (return_hidden_states) --------------------------------------------------------
def _hidden_oracle(prompt: list[int], output: list[int], cached: int = 0) -> list:
    """What SGLang's AR server returns for `output`: the prompt's rows past the cached prefix in
    one entry, then per output token after the first the row of its input (the token before it)."""
    rows = [[float(t), float(p)] for p, t in enumerate(prompt + output)]
    return [rows[cached:len(prompt)]] + rows[len(prompt):len(prompt) + len(output) - 1]


@pytest.mark.parametrize("algorithm_config,context_chunk", [
    ({"draft_length": 7}, None), ({"draft_length": 7}, 3), ({"draft_length": 0}, None), ({}, 4),
], ids=["whole_blocks", "chunked_prompt", "ar_steps", "adaptive_chunked"])
def test_hidden_states_are_the_rows_that_produced_each_token(sgl, algorithm_config, context_chunk):
    """Every committed token's row is the one its verify position (or decode step) produced it
    from, the prompt's entry holds every chunk's rows, and a request that did not ask gets none;
    whatever the rounds (accepted drafts, AR steps, the adaptive policy)."""
    h = Harness(2, context_chunk=context_chunk, algorithm_config=algorithm_config)
    h.runner.hidden = True
    prompts = [[2, 4, 6, 8, 10, 12, 14], [3, 5, 7], [9, 1, 2, 3, 4]]
    asking = [h.add(p, max_new_tokens=21, return_hidden_states=True) for p in prompts[:2]]
    other = h.add(prompts[2], max_new_tokens=21)
    h.run()
    for req, prompt in zip(asking, prompts):
        out = list(req.output_ids)
        assert out == oracle(prompt, 21, set())
        assert req.hidden_states == _hidden_oracle(prompt, out)
    assert other.hidden_states == [] and list(other.output_ids) == oracle(prompts[2], 21, set())
    rounds = asking[0].customized_info["dllm_spec_round"][-1]
    if algorithm_config.get("draft_length") == 7:  # rounds committed accepted drafts: their rows are checked
        assert rounds < len(asking[0].output_ids) - 1
    if algorithm_config.get("draft_length") == 0:
        assert all(k == 0 for _, k in _rounds_of(asking[0]))


@pytest.mark.parametrize("page_size", [1, 4])
def test_hidden_states_through_a_stop_and_in_last_mode(sgl, page_size):
    """An EOS inside a round's accepted drafts: the rows through it are the oracle's (SGLang's
    output streamer cuts the list at `finished_len`, as for its own speculative decoding); "last"
    keeps one row, the last emitted token's."""
    prompt = [2, 4, 6, 8]
    truth = oracle(prompt, 20, set())
    eos = truth[9]
    h = Harness(page_size)
    h.runner.hidden = True
    full = h.add(prompt, max_new_tokens=20, eos={eos}, return_hidden_states=True)
    last = h.add(prompt, max_new_tokens=20, eos={eos}, return_hidden_states="last")
    h.run()
    out = list(full.output_ids_through_stop)
    assert out == truth[:10]
    assert full.hidden_states[:len(out)] == _hidden_oracle(prompt, out)
    assert last.hidden_states == [_hidden_oracle(prompt, out)[-1]]


def test_hidden_states_of_a_retracted_request_continue_its_rows(sgl):
    """A retraction re-encodes prompt + output: no second prompt entry; the seed that pass commits
    gets its row (the re-encoded last position), and the rows go on as if never retracted."""
    from sglang.srt.dllm.mixin.req import DllmReqPhase
    from sglang.srt.mem_cache.common import release_kv_cache

    h = Harness(4)
    h.runner.hidden = True
    prompt = [2, 4, 6, 8]
    req = h.add(prompt, max_new_tokens=30, return_hidden_states=True)
    for _ in range(3):
        h.step()
    release_kv_cache(req, h.tree, checkpoint=False)
    req.reset_for_retract()
    req.dllm_phase = DllmReqPhase.INCOMING_PREFILL
    h.staging.remove(req)
    assert h.step() == "context"
    h.run()
    out = list(req.output_ids)
    assert out == oracle(prompt, 30, set())
    assert req.hidden_states == _hidden_oracle(prompt, out)


def test_aborting_request_finishes_at_its_context_pass(sgl):
    """A request SGLang marked `to_finish` (aborted while queued) ends at its context pass."""
    from sglang.srt.managers.schedule_batch import FINISH_ABORT

    h = Harness(1)
    req = h.add([1, 2, 3], max_new_tokens=10)
    req.to_finish = FINISH_ABORT("test")
    h.run()
    assert isinstance(req.finished_reason, FINISH_ABORT) and len(req.output_ids) == 0
    assert h.sched.output_streamer.streamed == [[req.rid]] and h.alloc.available_size() == h.initial_free


def test_validate_request_refuses_unsupported_features(sgl):
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    from fast_dvlm_sglang.sglang_plugin.speculative import FastDVLMSpeculative, SpecState

    def req(**kw):
        sp = SamplingParams(max_new_tokens=4, **kw)
        sp.normalize(NO_STRINGS_TOKENIZER)
        r = Req("x", "", array("q", [1]), sp)
        r.tokenizer = NO_STRINGS_TOKENIZER
        return r

    logprobs = req()
    logprobs.return_logprob, logprobs.logprob.token_ids_logprob = True, [3, 4]  # served
    assert FastDVLMSpeculative.validate_request(logprobs) is None
    assert logprobs.dllm_algo_state.token_ids_logprob == (3, 4) and logprobs.dllm_algo_state.top_logprobs == 0
    logprobs = req()
    logprobs.return_logprob, logprobs.logprob.top_logprobs_num = True, 3  # output logprobs: served
    assert FastDVLMSpeculative.validate_request(logprobs) is None and logprobs.dllm_algo_state.top_logprobs == 3
    for kw in ({"json_schema": "{}"}, {"regex": "a+"}):  # grammars ride on req.grammar (structured_output.py)
        assert FastDVLMSpeculative.validate_request(req(**kw)) is None
    r = req(temperature=0.7, top_p=0.9, top_k=20, sampling_seed=3)
    assert FastDVLMSpeculative.validate_request(r) is None
    assert r.dllm_algo_state == SpecState(temperature=0.7, top_p=0.9, top_k=20, sampling_seed=3)
    # AR's logit adjustments ride on the state; "1" and "01" are one token (SGLang: the last wins)
    r = req(temperature=0.7, min_p=0.1, logit_bias={"1": 2.0, "01": -1.0, "5": 0.5}, min_new_tokens=3,
            stop_token_ids=[7])
    r.eos_token_ids = {2}
    assert FastDVLMSpeculative.validate_request(r) is None
    assert r.dllm_algo_state.unseeded_seed is not None  # unseeded: a rank-shared seed (test below)
    assert dataclasses.replace(r.dllm_algo_state, unseeded_seed=None) == SpecState(
        temperature=0.7, min_p=0.1, logit_bias=((1, -1.0), (5, 0.5)), min_new_tokens=3, stop_token_ids=(2, 7))
    r = req(temperature=0, min_p=0.3)  # greedy: min_p cannot change an argmax
    FastDVLMSpeculative.validate_request(r)
    assert r.dllm_algo_state == SpecState()
    r = req(temperature=0)
    FastDVLMSpeculative.validate_request(r)
    assert r.dllm_algo_state.greedy


# ---- property test: random traffic, aborts, chunked contexts, page sizes -------------------------
try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    st = None


if st is not None:

    @st.composite
    def traffic(draw):
        page_size = draw(st.sampled_from([1, 2, 4, 8]))
        block_size = draw(st.sampled_from([8, 16])) if page_size == 8 else draw(st.sampled_from([4, 8]))
        n = draw(st.integers(1, 6))
        # Prompts often share a prefix (a system prompt) so the radix cache has something to hit.
        shared = draw(st.lists(st.integers(0, V - 2), min_size=0, max_size=20))
        reqs = []
        for _ in range(n):
            own = draw(st.lists(st.integers(0, V - 2), min_size=1, max_size=24))
            prompt = (shared + own) if draw(st.booleans()) else own
            max_new = draw(st.integers(1, 40))
            eos = draw(st.sets(st.integers(0, V - 2), max_size=2))
            reqs.append((prompt, max_new, eos))
        aborts = draw(st.lists(st.tuples(st.integers(0, 30), st.integers(0, n - 1)), max_size=2))
        chunk = draw(st.one_of(st.none(), st.integers(1, 9)))
        wrong_every = draw(st.sampled_from([2, 3, 5, 1000]))
        radix = draw(st.booleans())
        return page_size, block_size, reqs, aborts, chunk, wrong_every, radix

    @settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(traffic())
    def test_random_traffic_keeps_the_pool_exact(sgl, case):
        """Random batches, chunked context passes, aborts, the prefix cache on or off: every
        answer is the oracle's, every page is free, the tree's or one request's after every step,
        and afterwards the pool is whole again (free + the tree's evictable pages, no lock left).
        With the cache on, a second turn (prompt + answer + more) runs after the first batch."""
        page_size, block_size, reqs, aborts, chunk, wrong_every, radix = case
        h = Harness(page_size, block_size=block_size, context_chunk=chunk, wrong_every=wrong_every, radix=radix)
        made = [h.add(p, m, eos=e) for p, m, e in reqs]
        aborted = set()

        def between(harness, step):
            for at, idx in aborts:
                if at == step and made[idx] in harness.reqs and not made[idx].finished():
                    harness.abort(made[idx])
                    aborted.add(idx)

        h.run(between=between)
        for i, (req, (prompt, max_new, eos)) in enumerate(zip(made, reqs)):
            truth = oracle(prompt, max_new, eos)
            if i in aborted:
                assert truth[: len(_ids(req))] == _ids(req)
            else:
                assert _ids(req) == truth, (i, prompt, max_new, eos)
        h.check_drained()
        if radix:
            first, (prompt, _, _) = made[0], reqs[0]
            follow = prompt + _ids(first) + [1, 2]
            req = h.add(follow, 12)
            h.run()
            assert _ids(req) == oracle(follow, 12, set())
            if 0 not in aborted:  # the first turn's prompt and answer were inserted at its finish
                # (its last token may have no KV: a seed that ended it is never written)
                assert req.cached_tokens >= (len(prompt) + len(_ids(first)) - 1) // page_size * page_size
            h.check_drained()
        h.tree.evict(_evict_all(h))
        free = h.alloc.get_all_free_pages()
        assert h.alloc.available_size() == h.initial_free
        assert torch.unique(free).numel() == free.numel() == POOL_TOKENS // page_size


def _evict_all(h):
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    return EvictParams(num_tokens=POOL_TOKENS)


# ---- per-round cost and SGLang's CUDA-graph inputs ----------------------------------------------
_HOST_SYNCS = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__int__,
               torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.cpu, torch.Tensor.numpy}


class _CountHostSyncs(torch.overrides.TorchFunctionMode):
    """Counts the tensor-to-host reads (each one a device sync on a GPU) made by our code; the
    runner's own work is not counted (`paused`)."""

    def __init__(self):
        super().__init__()
        self.count, self.paused = 0, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _HOST_SYNCS and not self.paused:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_one_metadata_plan_and_one_host_sync_per_round(sgl, monkeypatch):
    """A round's draft and verify share slots and context, so the attention metadata planned for
    the draft serves the verify (SGLang's `mark_forward_metadata_ready`): one plan per round,
    not two. One host sync per round: the packed accept lengths, seeds and block ids. M-RoPE
    positions computed once per round (the model's forward does not redo them, test_cuda_paths)."""
    from fast_dvlm_sglang.sglang_plugin import speculative

    positions = []
    compute = speculative.set_extend_mrope_positions
    monkeypatch.setattr(speculative, "set_extend_mrope_positions", lambda fb: positions.append(fb) or compute(fb))
    h = Harness(4)
    for plen, n in ((3, 30), (9, 17), (5, 40)):
        h.add(list(range(1, plen + 1)), max_new_tokens=n)
    counter, syncs_per_round = _CountHostSyncs(), []
    run_round, forward = h.algo._round, h.runner.forward

    def counted_round(*args):
        counter.count = 0
        with counter:
            result = run_round(*args)
        syncs_per_round.append(counter.count)
        return result

    def uncounted_forward(*args, **kwargs):
        counter.paused = True
        try:
            return forward(*args, **kwargs)
        finally:
            counter.paused = False

    h.algo._round, h.runner.forward = counted_round, uncounted_forward
    h.run()
    contexts = sum(1 for c in h.runner.calls if not c[0])
    rounds = sum(1 for c in h.runner.calls if c[1])  # one causal verify per round
    assert rounds == len(syncs_per_round) > 3
    assert h.runner.metadata_inits == contexts + rounds
    assert syncs_per_round == [1] * rounds
    assert len(positions) == contexts + rounds
    for req in h.done:
        assert _ids(req) == oracle(list(req.origin_input_ids), req.sampling_params.max_new_tokens, set())


def test_planning_is_skipped_only_where_sglang_checks_the_marker():
    """Source pins: the marker the round sets is what SGLang's eager and graph runners consult
    before planning attention metadata (what `FakeRunner` mimics)."""
    import inspect

    from sglang.srt.model_executor.runner.decode_cuda_graph_runner import DecodeCudaGraphRunner
    from sglang.srt.model_executor.runner.eager_runner import EagerRunner

    for method in (EagerRunner._execute_extend, EagerRunner._execute_decode):  # (decode: `decode_steps.py`)
        eager = inspect.getsource(method)
        assert "forward_batch.needs_forward_metadata_init()" in eager, method.__name__
        assert eager.index("needs_forward_metadata_init()") < eager.index("init_forward_metadata("), method.__name__
    assert "if not forward_batch.needs_forward_metadata_init():" in inspect.getsource(DecodeCudaGraphRunner.load_batch)


class _PastTheCheck(Exception):
    pass


class GraphRunnerStub:
    """What `DecodeCudaGraphRunner.__init__` sets for our algorithms (requires_separate_context_
    encoding: `dllm_uses_input_embeds`; no `capture_input_preparation`), spec's two variants; any
    other attribute means `load_batch` got past its input-embedding check."""

    dllm_uses_input_embeds = True
    dllm_input_preparation = None

    def __init__(self):
        from fast_dvlm_sglang.sglang_plugin.attention_modes import SpecAttentionModes

        self.attention_graph_variants = SpecAttentionModes()

    def __getattr__(self, name):
        raise _PastTheCheck(name)


class GraphReplayRunner(FakeRunner):
    """A model runner whose DLLM_EXTEND forwards replay a decode CUDA graph: each goes through
    SGLang's real `DecodeCudaGraphRunner.load_batch` check, then the captured graph reads the
    block's embeddings from the batch (asserted equal to the ids' embeddings)."""

    def __init__(self):
        super().__init__()
        self.decode_cuda_graph_runner = GraphRunnerStub()
        embed = torch.nn.Embedding(V, 4)
        self.model = SimpleNamespace(get_input_embeddings=lambda: embed)
        self.replays = 0

    def forward(self, fb, pp_proxy_tensors=None):
        from sglang.srt.model_executor.runner.decode_cuda_graph_runner import DecodeCudaGraphRunner

        if fb.forward_mode.is_dllm_extend():
            with pytest.raises(_PastTheCheck):
                DecodeCudaGraphRunner.load_batch(self.decode_cuda_graph_runner, fb)
            embed = self.model.get_input_embeddings()
            assert torch.equal(fb.input_embeds, embed(fb.input_ids)), "stale block embeddings"
            self.replays += 1
        return super().forward(fb, pp_proxy_tensors)


def test_graph_replay_has_the_block_embeddings_of_every_pass(sgl):
    """SGLang's decode graph runner refuses a DLLM_EXTEND replay without `input_embeds` for an
    algorithm with separate context encoding ("Diffusion graph replay requires prepared input
    embeddings"); spec's draft and verify passes each bring the embeddings of their own ids."""
    import inspect

    from sglang.srt.model_executor.runner.decode_cuda_graph_runner import DecodeCudaGraphRunner

    source = inspect.getsource(DecodeCudaGraphRunner.__init__)
    assert "self.dllm_uses_input_embeds = (\n            self.is_dllm and self.dllm_config.requires_separate_context_encoding" in source
    h = Harness(1)
    h.runner = GraphReplayRunner()
    for plen, n in ((3, 20), (7, 9)):
        h.add(list(range(1, plen + 1)), max_new_tokens=n)
    h.run()
    assert h.runner.replays == sum(1 for c in h.runner.calls if c[0]) > 2
    for req in h.done:
        assert _ids(req) == oracle(list(req.origin_input_ids), req.sampling_params.max_new_tokens, set())


def test_mdm_graph_replay_has_the_block_embeddings(sgl):
    from sglang.srt.dllm.config import DllmConfig
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from fast_dvlm_sglang.sglang_plugin.algorithm import FastDVLMBlock

    bs, size = 2, 8
    algo = FastDVLMBlock(DllmConfig("FastDVLMBlock", {"sub_block_size": 4, "threshold": 0.5}, size, MASK, bs,
                                    first_done_first_out_mode=True, requires_separate_context_encoding=True))
    runner = GraphReplayRunner()
    fb = FakeForwardBatch(input_ids=torch.full((bs * size,), MASK), forward_mode=ForwardMode.DLLM_EXTEND,
                          positions=torch.cat([torch.arange(5, 5 + size), torch.arange(9, 9 + size)]),
                          batch_size=bs, mrope_positions=None)
    states = [{"first_token": 3, "masked": None}, {"first_token": 4, "masked": None}]
    for _ in range(size):
        _, ids, done, states, _ = algo.run(runner, fb, states)
        if all(d == size for d in done):
            break
    assert runner.replays >= 2 and all(d == size for d in done)


# ---- draft lengths (`draft_length.py`) --------------------------------------------------------------
def _rounds_of(req) -> list[tuple[int, int]]:
    """(round, draft length) of each round a request ran, from its per-token metrics."""
    info = req.customized_info
    seen = {}
    for r, k in zip(info["dllm_spec_round"], info["dllm_draft_length"]):
        seen.setdefault(r, k)
    return sorted(seen.items())[1:]  # round 0: the context pass


@pytest.mark.parametrize("page_size", [1, 4])
@pytest.mark.parametrize("k", [0, 1, 3, 4, 7])
def test_pinned_draft_length(sgl, k, page_size):
    """`draft_length: k`: every round is [seed, k placeholders] (fewer where the budget ends
    first), rows share the forwards, k = 0 runs AR steps (one causal forward, no draft pass); the
    output is the AR truth and the pool stays exact after every step (`check_invariants`)."""
    h = Harness(page_size, algorithm_config={"draft_length": k})
    specs = ((3, 30), (11, 7), (6, 19), (2, 1))
    reqs = [h.add(list(range(1, plen + 1)), max_new_tokens=n) for plen, n in specs]
    h.run()
    for req, (plen, n) in zip(reqs, specs):
        assert _ids(req) == oracle(list(range(1, plen + 1)), n, set())
        info = req.customized_info
        budget = n - 1  # after the seed of the context pass
        for r, drafted in _rounds_of(req):
            assert drafted == min(k, budget - 1), (req.rid, r)  # the width never passes the budget
            budget -= info["dllm_spec_round"].count(r)
        assert budget == 0 or req.finished_reason is not None
        assert info["dllm_nfe"][-1] == sum(1 + (d > 0) for _, d in _rounds_of(req))
    rounds = [c for c in h.runner.calls if c[0]]
    if k == 0:
        assert all(causal for _, causal, *_ in rounds), "an AR step runs no draft pass"
    sizes = {c[2][0] for c in rounds}
    assert max(sizes) <= len(specs) * (k + 1)
    assert h.alloc.available_size() == h.initial_free


# SGLang wants a tokenizer for min_new_tokens (its eos_token_id); this one has no extra stop ids.
NO_STRINGS_TOKENIZER = SimpleNamespace(eos_token_id=None, additional_stop_token_ids=None)


def adjusted_oracle(prompt: list[int], n: int, eos: set[int], **options) -> list[int]:
    """AR on the fake LM with AR's logit adjustments at each step (`decoding.sampling`)."""
    from fast_dvlm_sglang.decoding.sampling import SamplingParams, adjust_logits

    params = SamplingParams(**options)
    out, tok, pos = [], prompt[-1], len(prompt) - 1
    while len(out) < n:
        logits = torch.nn.functional.one_hot(nxt(torch.tensor(tok), torch.tensor(pos)), V).float() * 10
        tok = int(adjust_logits(logits, params, len(out), eos, history=out).argmax())
        pos += 1
        out.append(tok)
        if tok in eos:
            break
    return out


@pytest.mark.parametrize("draft_length", [None, 0, 3, 7, "runs"])
@pytest.mark.parametrize("page_size", [1, 4])
def test_logit_adjustments_apply_at_every_verify_position(sgl, draft_length, page_size):
    """logit_bias, min_new_tokens and the penalties are AR's at each position of a round: five
    requests in the same rounds (a bias that moves the answer, a min_new_tokens that holds the EOS
    off, neither, frequency + presence penalties, a repetition penalty) each equal AR with its own
    adjustments, at every draft length, the adaptive policy and AR runs (several DECODE steps
    per round, each counting the steps before it). Biases rank the replacements strictly (no
    argmax ties); the fake LM's logits are one-hot x 10."""
    if draft_length == "runs":  # drafts that never land, a dear round: AR runs after the probe
        h = Harness(page_size, algorithm_config=AR_RUN_CONFIG, wrong_every=10_000, hard_from=0)
    else:
        h = Harness(page_size, algorithm_config={} if draft_length is None else {"draft_length": draft_length})
    prompt = [3, 1, 4, 1, 5]
    free = oracle(prompt, 40, set())
    banned = free[2]  # the third answer token: the bias pushes it below 0, token 7 wins instead
    eos = free[1]  # without min_new_tokens the answer ends at its second token
    bias = {str(banned): -25.0, "7": 3.0, "9": 2.0}
    cases = [
        ({"logit_bias": bias}, set(), {"logit_bias": ((banned, -25.0), (7, 3.0), (9, 2.0))}),
        ({"min_new_tokens": 12, "logit_bias": {"11": 1.0}}, {eos},
         {"min_new_tokens": 12, "logit_bias": ((11, 1.0),)}),
        ({}, {eos}, {}),
    ]
    # Penalties over the output and the drafts before each position; a graded bias ranks every
    # token apart, so a penalised truth gives way to one definite token.
    graded = {str(t): 0.01 * t for t in range(V)}
    graded_ours = tuple((t, 0.01 * t) for t in range(V))
    cases += [
        ({"frequency_penalty": 6.0, "presence_penalty": 5.0, "logit_bias": graded}, set(),
         {"frequency_penalty": 6.0, "presence_penalty": 5.0, "logit_bias": graded_ours}),
        ({"repetition_penalty": 1000.0, "logit_bias": graded}, set(),
         {"repetition_penalty": 1000.0, "logit_bias": graded_ours}),
    ]
    reqs = [h.add(prompt, max_new_tokens=40, eos=e, tokenizer=NO_STRINGS_TOKENIZER, **sglang)
            for sglang, e, _ in cases]
    h.run()
    for req, (_, e, ours) in zip(reqs, cases):
        assert _ids(req) == adjusted_oracle(prompt, 40, e, **ours), ours
    biased, held, plain, counted, repeated = (_ids(r) for r in reqs)
    assert counted != free and repeated != free and counted != repeated  # the penalties bit
    assert biased != free and banned not in biased[:3]  # the bias changed the answer
    assert plain == free[:2] and len(held) >= 12 and eos not in held[:12]
    assert h.alloc.available_size() == h.initial_free
    if draft_length == "runs":
        assert any(len(steps) > 2 and all(steps) for steps in h.forwards_by_round)


def test_requests_pin_their_own_draft_length_in_one_batch(sgl):
    """`custom_params.draft_length` per request: rows of widths 1, 4 and 8 in the same forwards."""
    h = Harness(4, algorithm_config={})
    reqs = [h.add([1, 2, 3], max_new_tokens=24, custom_params={"draft_length": k}) for k in (0, 3, 7)]
    h.step()  # one context pass for the three
    h.step()  # one round for the three
    draft, verify = [c for c in h.runner.calls if c[0]][-2:]
    assert not draft[1] and verify[1] and draft[2] == (1 + 4 + 8,)
    h.run()
    for req, k in zip(reqs, (0, 3, 7)):
        assert _ids(req) == oracle([1, 2, 3], 24, set())
        assert {d for _, d in _rounds_of(req)} <= set(range(k + 1)) and _rounds_of(req)[0][1] == k


def test_adaptive_policy_drafts_where_drafts_land_and_steps_where_they_do_not(sgl):
    """Two requests in every round: one whose drafts are always right drafts whole blocks, one
    whose drafts are always wrong (positions past `hard_from`) falls back to AR steps after its
    first probe; both outputs are the AR truth."""
    h = Harness(1, algorithm_config={}, wrong_every=10_000, hard_from=100)
    easy = h.add([1, 2, 3], max_new_tokens=60)
    hard = h.add(list(range(1, 120)), max_new_tokens=60)
    h.run()
    assert _ids(easy) == oracle([1, 2, 3], 60, set())
    assert _ids(hard) == oracle(list(range(1, 120)), 60, set())
    easy_k = [d for _, d in _rounds_of(easy)]
    hard_k = [d for _, d in _rounds_of(hard)]
    # both new: probed (width 8, the whole block here) in one draft pass; then the easy one
    # drafts whole blocks until the budget's last few tokens (where a draft pass no longer pays)
    assert easy_k[0] == hard_k[0] == 7
    assert easy_k[1:7] == [h.block_size - 1] * 6 and len(easy_k) <= 7 + 3
    # the hard one rides along with a short draft while the batch drafts anyway (a few tokens
    # more in forwards that run regardless), and runs AR steps once alone
    assert set(hard_k[1:len(easy_k)]) <= {0, 3}
    assert hard_k[len(easy_k):] == [0] * (len(hard_k) - len(easy_k))
    # rows of different widths shared the forwards
    assert any(c[2][0] not in (2, 2 * h.block_size) for c in h.runner.calls if c[0])


def test_bad_draft_length_settings_are_refused(sgl):
    from fast_dvlm_sglang.sglang_plugin.speculative import FastDVLMSpeculative, check_algorithm_config

    for cfg, match in (({"draft_length": 8}, r"\[0, 7\]"), ({"draft_length": True}, "draft_length"),
                       ({"draft_lenght": 3}, "unknown"), ({"draft_widths": [0, 4]}, "draft_widths"),
                       ({"forward_cost": {"base": -1, "per_token": 0}}, "base"),
                       ({"draft_margin": "high"}, "draft_margin"), ({"draft_margin": -0.5}, "draft_margin"),
                       ({"probe_interval": 2.5}, "probe_interval"), ({"probe_interval": float("inf")}, "probe_interval"),
                       ({"draft_margin": float("nan")}, "draft_margin"), ({"prior_acceptance": 1.0}, "prior_acceptance"),
                       ({"constrain_drafts": "no"}, "constrain_drafts must be true or false")):
        with pytest.raises(ValueError, match=match):
            check_algorithm_config(cfg, 8)
    h = Harness(1, algorithm_config={})
    for k in (8, -1, "3", 2.5):
        req = h.add([1, 2], max_new_tokens=4)
        req.sampling_params.custom_params = {"draft_length": k}
        req.dllm_algo_state = None
        assert "draft_length" in FastDVLMSpeculative.validate_request(req)


def test_graph_mode_keeps_whole_blocks_and_only_skips_drafts(sgl):
    """`cuda_graph: true`: SGLang's dLLM decode graphs are captured for `block_size` slots per
    request, so every row of every round keeps the whole block; the policy only decides whether
    the batch drafts (a round of AR steps runs the verify pass alone). Outputs stay the truth."""
    h = Harness(1, algorithm_config={"cuda_graph": True}, wrong_every=10_000, hard_from=0)
    reqs = [h.add(list(range(1, 6 + i)), max_new_tokens=40) for i in range(2)]
    h.run()
    for req in reqs:
        assert _ids(req) == oracle(list(req.origin_input_ids), 40, set())
    rounds = [c for c in h.runner.calls if c[0]]
    assert rounds and all(set(c[4]) == {h.block_size} for c in rounds)  # one captured canvas width
    verify_only = [c for i, c in enumerate(rounds) if c[1] and (i == 0 or rounds[i - 1][1])]
    assert verify_only, "drafts that never land: the batch falls back to AR rounds without a draft pass"
    # no AR runs under graphs: an AR step commits one token (each run pass would replay a whole block)
    for req in reqs:
        rounds_of = req.customized_info["dllm_spec_round"]
        assert all(rounds_of.count(r) == 1 for r, d in _rounds_of(req) if d == 0)


# A cost model where the scheduler's per-round bookkeeping dwarfs a forward: the policy runs AR
# steps in runs (`DraftPolicy.ar_run`) once the drafts have failed their probe.
AR_RUN_CONFIG = {"forward_cost": {"base": 0.001, "per_token": 1e-6, "per_round": 0.1}, "prior_acceptance": 0.0}


@pytest.mark.parametrize("page_size", [1, 4])
def test_ar_runs_are_ar_steps_in_fewer_rounds(sgl, page_size):
    """Drafts that never land and a dear per-round cost: after its probe every greedy request
    runs AR runs of up to a block (8 causal passes, no draft pass, in one round) next to a
    request pinned to AR steps (width 1, riding along) and one whose logit bias changes its
    answer. Outputs are the AR truth (with the bias: AR with it), an EOS inside a run ends the
    answer there, each run commits all its tokens (min(8, budget)) at one forward per token, the
    pool stays exact after every round (`check_invariants`) and drains to its initial size."""
    h = Harness(page_size, algorithm_config=AR_RUN_CONFIG, wrong_every=10_000, hard_from=0)
    prompt = [3, 1, 4, 1, 5]
    free = oracle(prompt, 40, set())
    eos = free[13]
    assert eos not in free[:13]
    bias = {str(free[5]): -25.0, "7": 3.0}
    reqs = [h.add(prompt, max_new_tokens=40), h.add(list(range(1, 12)), max_new_tokens=23),
            h.add(prompt, max_new_tokens=40, eos={eos}), h.add(prompt, max_new_tokens=30, logit_bias=bias),
            h.add(list(range(2, 9)), max_new_tokens=17, custom_params={"draft_length": 0})]
    h.run()
    assert _ids(reqs[0]) == free
    assert _ids(reqs[1]) == oracle(list(range(1, 12)), 23, set())
    assert _ids(reqs[2]) == free[:14]
    assert _ids(reqs[3]) == adjusted_oracle(prompt, 30, set(), logit_bias=((free[5], -25.0), (7, 3.0)))
    assert _ids(reqs[3]) != free[:30]
    assert _ids(reqs[4]) == oracle(list(range(2, 9)), 17, set())
    runs = 0
    for req in reqs:
        info = req.customized_info
        rounds = _rounds_of(req)
        budget = req.sampling_params.max_new_tokens - 1  # after the context pass's seed
        drafting = 0
        for r, drafted in rounds:
            n = info["dllm_spec_round"].count(r)
            if drafted:
                drafting += 1
            elif req is not reqs[4]:
                assert n == min(h.block_size, budget) or r == rounds[-1][0], (req.rid, r, n, budget)
                runs += n > 1
            else:
                assert n == 1  # pinned to AR steps
            budget -= n
        # one forward per token after the seed, plus the draft pass of each drafting round
        assert info["dllm_nfe"][-1] == len(req.output_ids) - 1 + drafting, req.rid
    assert runs >= 8
    # a run: one round of consecutive DECODE steps of the whole batch (rows of several lengths,
    # the shorter repeating their last step), no extend forward in it
    assert any(steps == [True] * h.block_size for steps in h.forwards_by_round)
    assert all(all(steps) or not any(steps) for steps in h.forwards_by_round)
    for c in h.runner.calls:
        if c[5]:
            assert c[2] == (len(c[4]),) and set(c[4]) == {1}  # one token per row
    h.check_drained() if h.radix else None
    assert h.alloc.available_size() == h.initial_free


def test_unseeded_sampling_runs_and_seeded_sampling_steps_alone(sgl):
    """AR runs draw each step from the request's own sampler, so an unseeded sampling request
    runs them; a seeded one takes single steps (a run's length depends on the batch, and its
    seed must give the same answer under any traffic). At temperature 0.01 on the fake LM's
    logits (one-hot x 10) a draw is the argmax but for odds of e^-1000: both are the AR truth."""
    h = Harness(1, algorithm_config=AR_RUN_CONFIG, wrong_every=10_000, hard_from=0)
    prompts = [[3, 1, 4, 1, 5], list(range(2, 11))]
    unseeded = h.add(prompts[0], max_new_tokens=30, temperature=0.01)
    seeded = h.add(prompts[1], max_new_tokens=30, temperature=0.01, sampling_seed=5)
    h.run()
    assert _ids(unseeded) == oracle(prompts[0], 30, set()) and _ids(seeded) == oracle(prompts[1], 30, set())
    assert max(unseeded.customized_info["dllm_ar_steps"]) == h.block_size
    assert max(seeded.customized_info["dllm_ar_steps"]) == 1
    assert h.alloc.available_size() == h.initial_free


def test_unseeded_sampling_draws_alike_on_every_rank(sgl):
    """Every tensor-parallel rank's scheduler admits the same request and draws its tokens with
    its own generator: an unseeded sampling request's generator seed comes from its id (and the
    server's random seed), so two ranks draw the same stream, another request another one; a
    seeded request keeps its seed, a greedy one has no generator."""
    rank0, rank1 = Harness(1, algorithm_config={}), Harness(1, algorithm_config={})
    a0, a1 = (h.add([1, 2, 3], max_new_tokens=8, rid="req-a", temperature=1.0) for h in (rank0, rank1))
    b0 = rank0.add([1, 2, 3], max_new_tokens=8, rid="req-b", temperature=1.0)
    seeded = rank0.add([1, 2, 3], max_new_tokens=8, rid="req-c", temperature=1.0, sampling_seed=7)
    greedy = rank0.add([1, 2, 3], max_new_tokens=8, rid="req-d")
    assert a0.dllm_algo_state.unseeded_seed == a1.dllm_algo_state.unseeded_seed is not None
    assert b0.dllm_algo_state.unseeded_seed != a0.dllm_algo_state.unseeded_seed
    gens = [r.dllm_algo_state.with_generator("cpu").generator for r in (a0, a1, b0)]
    draws = [torch.rand(8, generator=g).tolist() for g in gens]
    assert draws[0] == draws[1] != draws[2]
    assert seeded.dllm_algo_state.with_generator("cpu").generator.initial_seed() == 7
    assert seeded.dllm_algo_state.unseeded_seed is None and greedy.dllm_algo_state.with_generator("cpu").generator is None


def test_without_decode_forwards_a_round_of_ar_steps_takes_one_step(sgl, monkeypatch):
    """Where decode forwards cannot run (DP attention: every rank agreed on the round's extend
    token counts), a round the policy made an AR run runs one AR step per row, the verify pass
    alone over the seeds, and frees the rest of the run's slots: the AR truth, one token per row
    and round, the pool exact after every round and drained at the end."""
    from fast_dvlm_sglang.sglang_plugin import decode_steps

    monkeypatch.setattr(decode_steps, "usable", lambda model_runner, forward_batch: False)
    h = Harness(4, algorithm_config=AR_RUN_CONFIG, wrong_every=10_000, hard_from=0)
    prompts = [[3, 1, 4, 1, 5], list(range(1, 12))]
    reqs = [h.add(p, max_new_tokens=30) for p in prompts]
    h.run()
    for req, prompt in zip(reqs, prompts):
        assert _ids(req) == oracle(prompt, 30, set())
        rounds = req.customized_info["dllm_spec_round"]
        assert all(rounds.count(r) == 1 for r, drafted in _rounds_of(req) if drafted == 0)
    assert not any(c[5] for c in h.runner.calls)  # no DECODE forward
    assert h.alloc.available_size() == h.initial_free


def test_new_requests_start_from_the_servers_acceptance(sgl):
    """The workload prior (`DraftPolicy.seed`): once a request's probe has failed on this server,
    the next new greedy request starts on AR steps instead of a probe of its own; a seeded
    sampling request is still probed (its widths must not depend on other traffic); outputs
    stay the AR truth."""
    from fast_dvlm_sglang.sglang_plugin.draft_length import workload

    h = Harness(1, algorithm_config={}, wrong_every=10_000, hard_from=0)
    assert workload(h.sched).trials == 0
    first = h.add([1, 2, 3], max_new_tokens=30)
    h.run()
    assert _rounds_of(first)[0][1] == 7  # probed (width 8): every draft wrong
    assert workload(h.sched).trials >= 1 and workload(h.sched).successes == 0
    second = h.add([4, 5, 6, 7], max_new_tokens=30)
    h.run()
    sampled = h.add([4, 5, 6, 7], max_new_tokens=30, temperature=1.0, sampling_seed=3)
    h.run()
    assert _ids(first) == oracle([1, 2, 3], 30, set()) and _ids(second) == oracle([4, 5, 6, 7], 30, set())
    assert {d for _, d in _rounds_of(second)} == {0}  # seeded: no probe, AR steps only
    assert _rounds_of(sampled)[0][1] == 7  # probed as if it ran alone
    assert h.alloc.available_size() == h.initial_free
