"""`--attention-backend fast_dvlm_triton` (`sglang_plugin/triton_attention.py`) inside SGLang.

- registration (SGLang's registry, the command-line choices, our algorithms' supported lists,
  SGLang's dLLM backend resolution keeps it);
- the backend on SGLang's real KV pools (`MHATokenToKVPool`, `ReqToTokenPool`) and a real
  `RadixAttention`, eager EXTEND / DECODE / DLLM_EXTEND in both modes against the reference;
- CUDA-graph capture and replay as SGLang's decode graph runner drives them (buffers made once
  by `init_cuda_graph_state`, `init_forward_metadata_out_graph` before each capture and each
  replay, one capture per attention variant), replayed on CPU by running the captured metadata;
- the real server on CPU (kernel in Triton's interpreter) against the reference decoders for
  ar, mdm and spec, with images and text, concurrent requests.
"""

from __future__ import annotations

import concurrent.futures as cf
from types import SimpleNamespace

import pytest
import torch

pytestmark = [pytest.mark.sglang, pytest.mark.many_servers]

BLOCK = 8
HEADS, KV_HEADS, DIM = 4, 2, 16


def test_registered_once_and_kept_by_dllm_resolution():
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES
    from sglang.srt.arg_groups.overrides import _dllm_attention_backend
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    from fast_dvlm_sglang.sglang_plugin import ALGORITHM_NAME, SPEC_ALGORITHM_NAME, register
    from fast_dvlm_sglang.sglang_plugin.triton_attention import BACKEND_NAME, create_backend, register_backend

    register()
    register_backend()  # idempotent
    assert ATTENTION_BACKENDS[BACKEND_NAME] is create_backend
    assert ATTENTION_BACKEND_CHOICES.count(BACKEND_NAME) == 1
    for algorithm in (ALGORITHM_NAME, SPEC_ALGORITHM_NAME):
        view = SimpleNamespace(dllm_algorithm=algorithm, attention_backend=BACKEND_NAME,
                               prefill_attention_backend=None, decode_attention_backend=None)
        assert _dllm_attention_backend(view) == {}, algorithm  # kept, not replaced


# ---- the backend on SGLang's real pools ---------------------------------------------------------
class _Runner:
    """What the backend reads from SGLang's ModelRunner."""

    def __init__(self, page_size=1):
        from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool

        self.device, self.page_size, self.use_mla_backend = "cpu", page_size, False
        self.kv_cache_dtype = torch.float32
        self.token_to_kv_pool = MHATokenToKVPool(size=512, page_size=page_size, dtype=torch.float32,
                                                 head_num=KV_HEADS, head_dim=DIM, layer_num=1, device="cpu",
                                                 enable_memory_saver=False)
        self.req_to_token_pool = ReqToTokenPool(size=8, max_context_len=160, device="cpu", enable_memory_saver=False)
        self.model_config = SimpleNamespace(get_max_num_attention_heads=lambda: HEADS)

    def decode_num_tokens_per_req(self):
        return BLOCK


@pytest.fixture(params=["unsplit", "split"])
def backend(monkeypatch, request):
    """The backend as SGLang builds it; `split`: with the GPU's split-KV path forced on at test
    sizes (the CPU default does not split), so its per-forward and graph scratch are exercised."""
    import sglang.srt.runtime_context as rc

    from fast_dvlm_sglang.kernels.block_attention import BlockAttentionConfig
    from fast_dvlm_sglang.sglang_plugin.triton_attention import create_backend

    monkeypatch.setattr(rc, "get_exec", lambda: SimpleNamespace(dllm=SimpleNamespace(dllm_algorithm="FastDVLMBlock")))
    monkeypatch.setattr(rc, "get_parallel", lambda: SimpleNamespace(attn_tp_size=1))
    made = create_backend(_Runner())
    if request.param == "split":
        made.config = BlockAttentionConfig(block_n=16, max_splits=4, min_split_keys=8, max_split_query=BLOCK)
    return made


def _layers():
    from sglang.srt.layers.radix_attention import RadixAttention

    from fast_dvlm_sglang.sglang_plugin.model import mode_selected

    causal = mode_selected(RadixAttention(HEADS, DIM, DIM ** -0.5, KV_HEADS, layer_id=0))
    return causal, causal._fast_dvlm_bidirectional  # the layer and its ENCODER_ONLY view


def _place(backend, rows, lengths, gen):
    """Give request rows `rows` contexts of `lengths` tokens at shuffled slots, K/V random."""
    pool, table = backend.token_to_kv_pool, backend.req_to_token_pool.req_to_token
    free = (torch.randperm(500, generator=gen) + 1).tolist()
    for r, n in zip(rows, lengths):
        table[r, :n] = torch.tensor([free.pop() for _ in range(n)], dtype=torch.int32)
    pool.get_key_buffer(0).normal_(generator=gen)
    pool.get_value_buffer(0).normal_(generator=gen)


def _batch(mode, rows, prefix, new):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    rows_t = torch.tensor(rows, dtype=torch.int64)
    return SimpleNamespace(
        forward_mode=mode, batch_size=len(rows), req_pool_indices=rows_t,
        seq_lens=torch.tensor([p + n for p, n in zip(prefix, new)], dtype=torch.int32),
        extend_seq_lens=None if mode == ForwardMode.DECODE else torch.tensor(new, dtype=torch.int32),
        extend_prefix_lens=None if mode == ForwardMode.DECODE else torch.tensor(prefix, dtype=torch.int32),
        extend_start_loc=None, extend_seq_lens_cpu=None if mode == ForwardMode.DECODE else list(new),
        out_cache_loc=None, encoder_lens=None)


def _expected(backend, fb, q, *, causal, prefix, new):
    from fast_dvlm_sglang.kernels.block_attention import block_attention_reference

    lens = torch.tensor(new, dtype=torch.int32)
    return block_attention_reference(
        q.view(-1, HEADS, DIM), backend.token_to_kv_pool.get_key_buffer(0), backend.token_to_kv_pool.get_value_buffer(0),
        backend.req_to_token_pool.req_to_token, fb.req_pool_indices, torch.cumsum(lens, 0) - lens, lens,
        torch.tensor([p + n for p, n in zip(prefix, new)]), causal=causal).view(q.shape[0], -1)


@pytest.mark.parametrize("mode_name", ["EXTEND", "DLLM_EXTEND", "DECODE"])
def test_eager_forwards_equal_the_reference(backend, mode_name):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    mode = ForwardMode[mode_name]
    gen = torch.Generator().manual_seed(1)
    rows, prefix = [3, 1, 6], [0, 17, 40]
    new = {"EXTEND": [12, 5, 1], "DLLM_EXTEND": [BLOCK] * 3, "DECODE": [1] * 3}[mode_name]
    _place(backend, rows, [p + n for p, n in zip(prefix, new)], gen)
    fb = _batch(mode, rows, prefix, new)
    backend.init_forward_metadata(fb)
    causal_layer, bidirectional = _layers()
    q = torch.randn(sum(new), HEADS * DIM, generator=gen)
    for layer, causal in ((causal_layer, True), (bidirectional, False)):
        if mode == ForwardMode.DECODE and not causal:
            continue
        run = backend.forward_decode if mode == ForwardMode.DECODE else backend.forward_extend
        out = run(q, None, None, layer, fb, save_kv_cache=False)
        torch.testing.assert_close(out.double(), _expected(backend, fb, q, causal=causal, prefix=prefix, new=new),
                                   atol=5e-5, rtol=0)  # float32 (see tests/test_block_attention.py)


def test_the_new_tokens_kv_is_written_before_attending(backend):
    """With save_kv_cache the block's K/V land in the pool at out_cache_loc, and the attention
    sees them (bidirectionally: every block token sees the last one)."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    gen = torch.Generator().manual_seed(2)
    _place(backend, [2], [10 + BLOCK], gen)
    fb = _batch(ForwardMode.DLLM_EXTEND, [2], [10], [BLOCK])
    fb.out_cache_loc = backend.req_to_token_pool.req_to_token[2, 10:10 + BLOCK].long()
    backend.init_forward_metadata(fb)
    _, bidirectional = _layers()
    q = torch.randn(BLOCK, HEADS * DIM, generator=gen)
    k, v = torch.randn(BLOCK, KV_HEADS, DIM, generator=gen), torch.randn(BLOCK, KV_HEADS, DIM, generator=gen)
    out = backend.forward_extend(q, k, v, bidirectional, fb)
    assert torch.equal(backend.token_to_kv_pool.get_key_buffer(0)[fb.out_cache_loc], k)
    torch.testing.assert_close(out.double(), _expected(backend, fb, q, causal=False, prefix=[10], new=[BLOCK]),
                               atol=5e-5, rtol=0)


def test_graph_capture_then_replay_reads_the_current_batch(backend):
    """SGLang's decode graph runner: `init_cuda_graph_state` once; per batch size and attention
    variant, `init_forward_metadata_out_graph(fb, in_capture=True)` then capture; per replay,
    `init_forward_metadata_out_graph(view)` then replay. A replay runs the kernel with the tensors
    the capture saw, so we replay by running with the capture-time metadata: each variant's
    replay must compute the *current* batch (new tables, lengths, padded rows), also when the
    other variant was captured or refreshed after it (what breaks flashinfer's per-capture plans)."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    gen = torch.Generator().manual_seed(3)
    backend.init_cuda_graph_state(max_bs=4, max_num_tokens=4 * BLOCK)
    causal_layer, bidirectional = _layers()
    captured = {}
    for label, layer in (("draft", bidirectional), ("verify", causal_layer)):  # capture order of the runner
        _place(backend, [0, 0], [BLOCK, BLOCK], gen)
        capture_fb = SimpleNamespace(forward_mode=ForwardMode.DLLM_EXTEND, batch_size=2,
                                     req_pool_indices=torch.zeros(2, dtype=torch.int64),
                                     seq_lens=torch.ones(2, dtype=torch.int32))
        backend.init_forward_metadata_out_graph(capture_fb, in_capture=True)
        captured[label] = (backend.forward_metadata, layer)

    for step, (rows, prefix) in enumerate([([5, 2], [30, 3]), ([1, 7], [64, 0]), ([4], [21])]):
        _place(backend, rows, [p + BLOCK for p in prefix], gen)
        bs = 2  # the captured size; one request pads to it (seq_len fill value 1, row 0)
        pad = bs - len(rows)
        view = SimpleNamespace(forward_mode=ForwardMode.DLLM_EXTEND, batch_size=bs,
                               req_pool_indices=torch.tensor(rows + [0] * pad, dtype=torch.int64),
                               seq_lens=torch.tensor([p + BLOCK for p in prefix] + [1] * pad, dtype=torch.int32),
                               encoder_lens=None, out_cache_loc=None)
        order = ("draft", "verify") if step % 2 == 0 else ("verify", "draft")
        for label in order:
            backend.init_forward_metadata_out_graph(view)  # the runner's replay prep
            meta, layer = captured[label]
            backend.forward_metadata = meta  # what the captured graph reads
            q = torch.randn(bs * BLOCK, HEADS * DIM, generator=gen)
            out = backend.forward_extend(q, None, None, layer, view, save_kv_cache=False)
            real = len(rows) * BLOCK
            fb = _batch(ForwardMode.DLLM_EXTEND, rows, prefix, [BLOCK] * len(rows))
            want = _expected(backend, fb, q[:real], causal=label == "verify", prefix=prefix, new=[BLOCK] * len(rows))
            torch.testing.assert_close(out[:real].double(), want, atol=5e-5, rtol=0, msg=f"step {step} {label}")
            assert not torch.isnan(out).any()


def test_full_prefill_graphs_are_refused_with_the_flag_to_use(backend):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    backend.init_cuda_graph_state(max_bs=2, max_num_tokens=16)
    fb = SimpleNamespace(forward_mode=ForwardMode.EXTEND, batch_size=1, seq_lens=torch.ones(1, dtype=torch.int32),
                         req_pool_indices=torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match="--cuda-graph-backend-prefill=disabled"):
        backend.init_forward_metadata_out_graph(fb, in_capture=True)


def test_unsupported_layers_go_to_sglangs_code(backend):
    """Cross-attention, sliding windows and logit capping are not the kernel's: SGLang's
    torch_native code runs them."""
    from sglang.srt.layers.radix_attention import RadixAttention

    calls = []
    base = type(backend).__mro__[1]
    window = RadixAttention(HEADS, DIM, DIM ** -0.5, KV_HEADS, layer_id=0, sliding_window_size=4)
    capped = RadixAttention(HEADS, DIM, DIM ** -0.5, KV_HEADS, layer_id=0, logit_cap=30.0)
    original = base.forward_extend
    try:
        base.forward_extend = lambda self, *a, **kw: calls.append("sglang") or "sglang"
        for layer in (window, capped):
            assert backend.forward_extend(None, None, None, layer, SimpleNamespace(encoder_lens=None)) == "sglang"
    finally:
        base.forward_extend = original
    assert calls == ["sglang", "sglang"]


def test_fp8_kv_cache_is_refused(monkeypatch):
    import sglang.srt.runtime_context as rc

    from fast_dvlm_sglang.sglang_plugin.triton_attention import create_backend

    monkeypatch.setattr(rc, "get_exec", lambda: SimpleNamespace(dllm=SimpleNamespace(dllm_algorithm=None)))
    monkeypatch.setattr(rc, "get_parallel", lambda: SimpleNamespace(attn_tp_size=1))
    runner = _Runner()
    runner.kv_cache_dtype = torch.float8_e4m3fn
    with pytest.raises(ValueError, match="16/32-bit KV cache"):
        create_backend(runner)


# ---- the real server ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def triton_servers(tmp_path_factory):
    from fast_dvlm_sglang.demo import DEMO_CHECKPOINT
    from fast_dvlm_sglang.server_process import ServeProcess

    logs = tmp_path_factory.mktemp("triton_logs")
    servers = {a: ServeProcess(DEMO_CHECKPOINT, a, logs / f"{a}.log", max_running=4,
                               serve_args=["--attention-backend", "fast_dvlm_triton"],
                               sglang_args=["--disable-overlap-schedule"] if a == "ar" else None)
               for a in ("ar", "mdm", "spec")}
    try:
        for s in servers.values():
            s.wait_ready()
        yield servers
    finally:
        for s in servers.values():
            s.stop()


@pytest.mark.slow
def test_server_answers_equal_the_reference(triton_servers):
    """The demo model served through the kernel (Triton's interpreter): four concurrent held-out
    prompts per server (three with images, one text only; 2 to 31 new tokens); ar and mdm token for token equal to
    the reference decoders, which the torch_native server equals too (tests/sglang/test_server.py,
    test_spec_server.py); spec equal to reference AR up to a near tie."""
    from sglang_helpers import generate
    from test_spec_server import Reference, _demo_prompts

    from fast_dvlm_sglang.demo import DEMO_CHECKPOINT

    ref = Reference(DEMO_CHECKPOINT)
    convs = _demo_prompts()[1:4] + [([{"role": "user", "content": "What shape is in the image?"}], None, 24)]
    assert "fast_dvlm_triton" in triton_servers["spec"].log.read_text()
    for algorithm, server in triton_servers.items():
        def answer(conv, server=server):
            return generate(server, ref.text(conv[0]), image=conv[1], max_new_tokens=conv[2])["output_ids"]

        with cf.ThreadPoolExecutor(len(convs)) as pool:
            got = list(pool.map(answer, convs))
        for (msgs, url, n), ids in zip(convs, got):
            if algorithm == "spec":
                ref.tie_check.check(msgs, ref.ar(msgs, n), ids, f"spec, image {url is not None}, {n} tokens")
            else:
                assert ids == ref.run(msgs, n, algorithm=algorithm).token_ids, (algorithm, url is not None, n)
