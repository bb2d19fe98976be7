"""Pieces of the CUDA serving path that CPU serving never exercises, checked on CPU against SGLang's
real objects (the multimodal processor, the model class's forward, sampling generators, host
copies). The resolution of attention backends is in test_attention_modes.py, the graph replay
inputs and per-round costs in test_spec_scheduler.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.sglang


@pytest.fixture(scope="module")
def published(tiny_checkpoints):
    from sglang.srt import runtime_context as rc
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import ServerArgs

    load_plugins()
    try:
        sa = rc.get_context().server_args
    except ValueError:
        sa = None
    if sa is None:
        sa = ServerArgs(model_path=str(tiny_checkpoints["new"]), device="cpu", attention_backend="torch_native",
                        sampling_backend="pytorch", dtype="float32", disable_cuda_graph=True)
        rc.publish(sa, role="scheduler", ranks=rc.SpawnRanks(world_rank=0))
    return sa


def test_image_processor_gets_qwen25vl_preprocessing_concurrency(tiny_checkpoints, published):
    """SGLang's Qwen-VL processor decides preprocessing concurrency from the model type in the
    first lines of its __init__: ours must be seen as qwen2_5_vl there, not after."""
    from transformers import AutoConfig, AutoProcessor

    from fast_dvlm_sglang.sglang_plugin.processor import FastDVLMImageProcessor

    cfg = AutoConfig.from_pretrained(tiny_checkpoints["new"])
    proc = FastDVLMImageProcessor(cfg, published, AutoProcessor.from_pretrained(tiny_checkpoints["new"]), None)
    assert proc.model_type == "qwen2_5_vl"
    assert proc.supports_mm_processor_concurrency and proc.auto_mm_processor_worker_num == 2
    assert proc.auto_mm_io_worker_num == 16
    assert cfg.model_type == "fast_dvlm"  # the server's config is not changed


def test_unseeded_sampling_leaves_the_global_generators_alone():
    """torch.seed() reseeds the process's default CPU (and CUDA) generators: an unseeded request
    must not change the random stream of everything else in the process."""
    from fast_dvlm_sglang.sglang_plugin.speculative import SpecState

    torch.manual_seed(1234)
    state = torch.get_rng_state()
    a = SpecState(temperature=0.7).with_generator("cpu")
    b = SpecState(temperature=0.7).with_generator("cpu")
    assert torch.equal(torch.get_rng_state(), state)
    assert a.generator.initial_seed() != b.generator.initial_seed()
    seeded = SpecState(temperature=0.7, sampling_seed=42).with_generator("cpu")
    assert seeded.generator.initial_seed() == 42


def test_host_values_are_pinned_before_an_async_copy_to_cuda(monkeypatch):
    from fast_dvlm_sglang.sglang_plugin.model import copy_to_device

    calls = []
    host = torch.arange(6)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append("pin") or self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, device, non_blocking=False: calls.append(
        (torch.device(device).type, non_blocking)) or self)
    assert copy_to_device(host, "cpu") is host and calls == []
    copy_to_device(host, "cuda")
    assert calls == ["pin", ("cuda", True)]


def test_kv_cache_scales_load_under_sglangs_attention_names():
    """Calibrated KV-cache scales (llmcompressor's kv_cache_scheme, modelopt's k/v_proj form), in
    both key layouts, load into the RadixAttention's `k_scale` / `v_scale` (`...self_attn.attn.`)."""
    from fast_dvlm_sglang.sglang_plugin.model import is_kv_scale, sglang_param_name

    for prefix in ("model.language_model.layers.3.", "model.layers.3."):
        for stored in ("self_attn.k_scale", "self_attn.k_proj.k_scale", "self_attn.attn.k_scale"):
            assert sglang_param_name(prefix + stored) == "model.layers.3.self_attn.attn.k_scale"
        assert sglang_param_name(prefix + "self_attn.v_proj.v_scale") == "model.layers.3.self_attn.attn.v_scale"
        assert sglang_param_name(prefix + "self_attn.k_proj.weight") == "model.layers.3.self_attn.qkv_proj.weight"
    assert is_kv_scale("model.layers.0.self_attn.k_scale") and not is_kv_scale("model.layers.0.mlp.down_proj.weight_scale")


class _StubTextModel(torch.nn.Module):
    def __init__(self, vocab=11, width=4):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(vocab, width)
        self.seen = None

    def forward(self, input_ids, positions, forward_batch, input_embeds=None):
        self.seen = (input_ids, positions, input_embeds)
        return input_embeds * 2


def _stub_model():
    from fast_dvlm_sglang.sglang_plugin.model import Fast_dVLMForConditionalGeneration

    model = Fast_dVLMForConditionalGeneration.__new__(Fast_dVLMForConditionalGeneration)
    torch.nn.Module.__init__(model)
    model.model = _StubTextModel()
    model.lm_head = torch.nn.Identity()
    model.logits_processor = lambda ids, hidden, head, fb: ("logits", hidden)
    model.is_mrope_enabled = True
    return model


def test_block_forward_runs_on_the_embeddings_the_graph_buffer_holds(monkeypatch):
    """Under SGLang's DLLM_EXTEND graphs the captured forward gets `input_embeds` (a static buffer
    the replay refills): the model must compute from it. Qwen2.5-VL's own forward ignores it."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from sglang.srt.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

    model = _stub_model()
    embeds = torch.randn(6, 4, dtype=torch.bfloat16)  # SGLang's eager path casts embeddings to bf16
    mrope = torch.arange(18).view(3, 6)
    fb = SimpleNamespace(forward_mode=ForwardMode.DLLM_EXTEND, mrope_positions=mrope, mm_inputs=None)
    name, hidden = model.forward(torch.arange(6), torch.arange(6), fb, input_embeds=embeds)
    ids, positions, used = model.model.seen
    assert name == "logits" and ids is None and positions is mrope
    assert used.dtype == torch.float32 and torch.equal(used, embeds.float()) and torch.equal(hidden, 2 * embeds.float())
    # Everything else (context passes with images, AR) is Qwen2.5-VL's forward, which embeds the ids.
    called = []
    monkeypatch.setattr(Qwen2_5_VLForConditionalGeneration, "forward", lambda self, *a, **k: called.append(k) or "qwen")
    assert model.forward(torch.arange(6), torch.arange(6), fb) == "qwen"
    fb.forward_mode = ForwardMode.EXTEND
    assert model.forward(torch.arange(6), torch.arange(6), fb, input_embeds=embeds) == "qwen" and len(called) == 2


def test_model_forward_leaves_prepared_positions_alone(monkeypatch):
    """Inside `inputs_prepared()` (our algorithms' forwards, positions computed once per round) the
    model's forward does not recompute M-RoPE positions; other callers get them computed."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from fast_dvlm_sglang.sglang_plugin import model as plugin_model

    calls = []
    monkeypatch.setattr(plugin_model, "set_extend_mrope_positions", calls.append)
    model = _stub_model()
    fb = SimpleNamespace(forward_mode=ForwardMode.DLLM_EXTEND, mrope_positions=torch.zeros(3, 2), mm_inputs=None)
    with plugin_model.inputs_prepared():
        model.forward(torch.arange(2), torch.arange(2), fb, input_embeds=torch.zeros(2, 4))
    assert calls == []
    model.forward(torch.arange(2), torch.arange(2), fb, input_embeds=torch.zeros(2, 4))
    assert calls == [fb]


def test_block_embeddings_only_where_a_decode_graph_runner_replays():
    from fast_dvlm_sglang.sglang_plugin.model import prepare_block_embeds

    embed = torch.nn.Embedding(9, 3)
    fb = SimpleNamespace(input_ids=torch.tensor([1, 2, 8]), input_embeds=None)
    prepare_block_embeds(SimpleNamespace(decode_cuda_graph_runner=None), fb)
    assert fb.input_embeds is None  # eager: the model embeds the ids itself (no bf16 round trip)
    runner = SimpleNamespace(decode_cuda_graph_runner=object(), model=SimpleNamespace(get_input_embeddings=lambda: embed))
    prepare_block_embeds(runner, fb)
    assert torch.equal(fb.input_embeds, embed(fb.input_ids))


def test_block_mrope_positions_continue_from_each_requests_delta():
    """A block's M-RoPE positions: position + the request's mrope_position_delta (all three axes),
    computed from host values (no table copy to the device, no sync)."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from fast_dvlm_sglang.sglang_plugin.model import set_extend_mrope_positions

    mm = SimpleNamespace(mrope_position_delta=torch.tensor([[-7]]), mrope_positions=torch.zeros(3, 2))
    pos = torch.cat([torch.arange(40, 44), torch.arange(12, 16)])
    fb = SimpleNamespace(forward_mode=ForwardMode.DLLM_EXTEND, mrope_positions=torch.zeros(3, 8), positions=pos,
                         mm_inputs=[mm, None], extend_seq_lens_cpu=[4, 4])
    set_extend_mrope_positions(fb)
    expect = torch.cat([torch.arange(33, 37), torch.arange(12, 16)])
    assert torch.equal(fb.mrope_positions, expect.expand(3, -1))


def test_why_spec_graphs_need_triton_source_pins():
    """Finding behind `speculative.GRAPH_BACKEND`, pinned on SGLang's source: flashinfer makes a
    new prefill wrapper set at every DLLM_EXTEND capture and keeps only the last per batch size
    (so a replay re-plans the causal capture's set, never the bidirectional one's); triton's
    DLLM_EXTEND graph metadata is views of shared buffers that every replay refills in place."""
    import inspect

    from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend
    from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

    prepare = inspect.getsource(FlashInferAttnBackend._prepare_cuda_graph_metadata)
    dllm = prepare[prepare.index("is_dllm_extend()"):]
    assert "self._create_prefill_wrappers(bs" in dllm and "self.prefill_cuda_graph_metadata[bs] = prefill_wrappers" in dllm
    replan = inspect.getsource(FlashInferAttnBackend.init_forward_metadata_out_graph)
    assert "prefill_wrappers=self.prefill_cuda_graph_metadata[bs]" in replan

    build = inspect.getsource(TritonAttnBackend._build_cuda_graph_forward_metadata)
    branch = build[build.index("elif forward_mode.is_dllm_extend():"):]
    branch = branch[:branch.index("elif", 10)]
    assert "kv_indices=self.cuda_graph_kv_indices" in branch and "qo_indptr=self.qo_indptr[: bs + 1]" in branch
    apply = inspect.getsource(TritonAttnBackend._apply_cuda_graph_metadata)
    assert "self._update_dllm_buffers(plan, bs, seq_lens, req_pool_indices)" in apply
    update = inspect.getsource(TritonAttnBackend._update_dllm_buffers)
    assert "self.qo_indptr[: bs + 1] = " in update and "self.cuda_graph_kv_indices" in update


def test_block_forwards_return_their_hidden_states_eager_and_under_graph_replay(monkeypatch):
    """`return_hidden_states` under spec reads the verify pass's hidden states: SGLang's
    LogitsProcessor returns only the full logits of a DLLM_EXTEND forward, so the model's
    `BlockLogitsProcessor` adds them whenever the forward captures any (other forwards are
    SGLang's alone). Under spec's opt-in CUDA graphs the captured forward is this one, captured
    with the server's capture mode, and SGLang's replay hands the captured `hidden_states` back
    (pinned on its source: nothing else on CPU runs that replay)."""
    import inspect

    from sglang.srt.layers.logits_processor import LogitsProcessor, LogitsProcessorOutput
    from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardMode
    from sglang.srt.model_executor.runner.decode_cuda_graph_runner import DecodeCudaGraphRunner

    from fast_dvlm_sglang.sglang_plugin.model import BlockLogitsProcessor

    def sglangs(self, input_ids, hidden, lm_head, meta, *args, **kwargs):  # what SGLang returns per mode
        if meta.forward_mode.is_dllm_extend():
            return LogitsProcessorOutput(next_token_logits=None, full_logits=2 * hidden)
        return LogitsProcessorOutput(next_token_logits=hidden[-1:],
                                     hidden_states=hidden if meta.capture_hidden_mode.need_capture() else None)

    monkeypatch.setattr(LogitsProcessor, "forward", sglangs)
    processor = BlockLogitsProcessor.__new__(BlockLogitsProcessor)  # the forward alone
    hidden = torch.randn(5, 4)
    for mode, capture, block_rows in [(ForwardMode.DLLM_EXTEND, CaptureHiddenMode.FULL, True),
                                      (ForwardMode.DLLM_EXTEND, CaptureHiddenMode.LAST, True),
                                      (ForwardMode.DLLM_EXTEND, CaptureHiddenMode.NULL, False),
                                      (ForwardMode.EXTEND, CaptureHiddenMode.FULL, False),
                                      (ForwardMode.DECODE, CaptureHiddenMode.NULL, False)]:
        out = processor.forward(None, hidden, None, SimpleNamespace(forward_mode=mode, capture_hidden_mode=capture))
        if mode.is_dllm_extend():
            assert torch.equal(out.full_logits, 2 * hidden)
            assert (out.hidden_states is hidden) == block_rows, (mode, capture)
        else:  # SGLang's output untouched
            assert (out.hidden_states is hidden) == capture.need_capture()

    init = inspect.getsource(DecodeCudaGraphRunner.__init__)
    assert "self.capture_hidden_mode = self.return_hidden_states_mode" in init
    replay = inspect.getsource(DecodeCudaGraphRunner.execute)
    assert "output.hidden_states[: self.raw_num_token]" in replay
