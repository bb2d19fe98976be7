"""Attention mode per forward, eager and under SGLang's CUDA-graph variants (CPU: the selection
logic; the captures themselves need a GPU)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.sglang

from fast_dvlm_sglang.config import ARCHITECTURE  # noqa: E402
from fast_dvlm_sglang.sglang_plugin import attention_modes as am  # noqa: E402


class RecordingAttention(torch.nn.Module):
    """Stands in for RadixAttention: answers with its own attention type."""

    def __init__(self):
        super().__init__()
        from sglang.srt.layers.radix_attention import AttentionType

        self.attn_type = AttentionType.DECODER
        self.layer_id = 3

    def forward(self, q, k, v, forward_batch, **kwargs):
        return self.attn_type


def _batch(mode_name: str):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    return SimpleNamespace(forward_mode=getattr(ForwardMode, mode_name))


@pytest.fixture
def capture_variant():
    from sglang.srt.model_executor.runner_utils.capture_mode import (
        _set_capture_attention_variant,
        get_capture_attention_variant,
    )

    before = get_capture_attention_variant()
    yield _set_capture_attention_variant
    _set_capture_attention_variant(before)


@pytest.mark.parametrize("capturing", [None, am.BIDIRECTIONAL, am.CAUSAL])
@pytest.mark.parametrize("in_causal_pass", [False, True])
@pytest.mark.parametrize("mode", ["DLLM_EXTEND", "EXTEND", "DECODE"])
def test_layer_choice_eager_and_while_capturing(capture_variant, capturing, in_causal_pass, mode):
    """Eager: bidirectional only for DLLM_EXTEND outside causal_pass(). While SGLang captures one
    of our variants, the variant alone decides (the graph then replays for matching forwards)."""
    from sglang.srt.layers.radix_attention import AttentionType

    from fast_dvlm_sglang.sglang_plugin.model import mode_selected

    layer = mode_selected(RecordingAttention())
    assert layer.layer_id == 3 and layer._fast_dvlm_bidirectional.layer_id == 3  # same KV pages
    capture_variant(capturing)
    fb = _batch(mode)
    if capturing is not None:
        expect_bidirectional = capturing == am.BIDIRECTIONAL
    else:
        expect_bidirectional = mode == "DLLM_EXTEND" and not in_causal_pass
    if in_causal_pass:
        with am.causal_pass():
            got = layer(None, None, None, fb)
    else:
        got = layer(None, None, None, fb)
    assert got == (AttentionType.ENCODER_ONLY if expect_bidirectional else AttentionType.DECODER)


def _radix_attention(with_kv_scales: bool):
    """A real SGLang RadixAttention inside a Qwen-like `self_attn` block; with an FP8 KV cache's
    quant method, its `k_scale` / `v_scale` parameters (BaseKVCacheMethod.create_weights)."""
    from sglang.srt.layers.quantization.kv_cache import BaseKVCacheMethod
    from sglang.srt.layers.radix_attention import RadixAttention

    attn = RadixAttention(4, 8, 0.35, 2, layer_id=5)
    if with_kv_scales:
        BaseKVCacheMethod(None).create_weights(attn)
    block = torch.nn.Module()
    block.attn = attn
    return block


def test_bidirectional_view_is_live_and_names_are_sglangs():
    """The bidirectional side is a view of the causal layer, not a snapshot: attributes SGLang
    sets after loading (the FP8 KV cache's float scales) are what it attends with, and the
    layer's parameters keep SGLang's names (`attn.k_scale`, loadable from checkpoints)."""
    from sglang.srt.layers.quantization.kv_cache import BaseKVCacheMethod
    from sglang.srt.layers.radix_attention import AttentionType, RadixAttention

    from fast_dvlm_sglang.sglang_plugin.model import is_mode_selected, mode_selected

    block = _radix_attention(with_kv_scales=True)
    attn = mode_selected(block.attn)
    assert mode_selected(attn) is attn and is_mode_selected(attn) and block.attn is attn  # idempotent, in place
    view = attn._fast_dvlm_bidirectional
    assert isinstance(view, RadixAttention) and isinstance(attn, RadixAttention)
    assert sorted(n for n, _ in block.named_parameters()) == ["attn.k_scale", "attn.v_scale"]
    assert [m for m in block.modules() if isinstance(m, RadixAttention)] == [attn]  # one layer per layer_id
    with torch.no_grad():
        attn.k_scale.fill_(0.5)
        attn.v_scale.fill_(0.25)
    BaseKVCacheMethod(None).process_weights_after_loading(attn)  # sets k_scale_float / v_scale_float
    assert (attn.k_scale_float, attn.v_scale_float) == (0.5, 0.25)
    assert (view.k_scale_float, view.v_scale_float) == (0.5, 0.25)
    assert view.k_scale is attn.k_scale and view.layer_id == attn.layer_id == 5
    attn.sliding_window_size = 7  # anything set on the layer later, too
    assert view.sliding_window_size == 7
    assert attn.attn_type == AttentionType.DECODER and view.attn_type == AttentionType.ENCODER_ONLY


def test_mode_selected_layer_runs_the_backend_with_the_right_layer(monkeypatch):
    """The real RadixAttention.forward hands the attention backend the causal layer or its view."""
    from sglang.srt.layers import radix_attention as ra
    from sglang.srt.layers.radix_attention import AttentionType

    from fast_dvlm_sglang.sglang_plugin.model import mode_selected

    seen = []
    backend = SimpleNamespace(forward=lambda q, k, v, layer, fb, save, **kw: seen.append(layer.attn_type) or q)
    monkeypatch.setattr(ra, "get_attn_backend", lambda: backend)
    monkeypatch.setattr(ra, "padded_extend_real_tokens", lambda q, fb: None)
    attn = mode_selected(_radix_attention(with_kv_scales=False).attn)
    q = torch.zeros(2, 32)
    kv = torch.zeros(2, 16)
    attn(q, kv, kv, _batch("DLLM_EXTEND"))
    with am.causal_pass():
        attn(q, kv, kv, _batch("DLLM_EXTEND"))
    attn(q, kv, kv, _batch("EXTEND"))
    assert seen == [AttentionType.ENCODER_ONLY, AttentionType.DECODER, AttentionType.DECODER]


def test_replay_selects_the_capture_the_forward_needs():
    """Every replayed forward picks the variant whose capture ran the same attention."""
    modes = am.SpecAttentionModes()
    assert set(modes.capture_labels) == {am.BIDIRECTIONAL, am.CAUSAL}
    fb = _batch("DLLM_EXTEND")
    assert modes.select(fb) == am.BIDIRECTIONAL and am.runs_bidirectional(fb)
    with am.causal_pass():
        assert modes.select(fb) == am.CAUSAL and not am.runs_bidirectional(fb)
    assert modes.select(fb) == am.BIDIRECTIONAL  # the context variable is reset on exit


def _write_yaml(tmp_path, text):
    path = tmp_path / "algo.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("algorithm,yaml_text,arch,ours", [
    ("FastDVLMSpeculative", "cuda_graph: true\n", ARCHITECTURE, True),
    ("FastDVLMSpeculative", "cuda_graph: false\n", ARCHITECTURE, False),
    ("FastDVLMSpeculative", None, ARCHITECTURE, False),
    ("FastDVLMBlock", "cuda_graph: true\n", ARCHITECTURE, False),
    ("FastDVLMSpeculative", "cuda_graph: true\n", "Qwen2_5_VLForConditionalGeneration", False),
])
def test_variant_factory_hook_is_ours_only_for_opted_in_spec(monkeypatch, tmp_path, algorithm, yaml_text, arch, ours):
    import sglang.srt.runtime_context as rc

    path = None if yaml_text is None else _write_yaml(tmp_path, yaml_text)
    monkeypatch.setattr(rc, "get_server_args", lambda: SimpleNamespace(dllm_algorithm=algorithm,
                                                                       dllm_algorithm_config=path))
    sentinel = object()
    got = am.create_attention_graph_variants(lambda cfg: sentinel, SimpleNamespace(architectures=[arch]))
    assert isinstance(got, am.SpecAttentionModes) if ours else got is sentinel


def test_variant_factory_hook_is_live(monkeypatch, tmp_path):
    """What DecodeCudaGraphRunner.__init__ calls (its module's global) gives our variants."""
    import sglang.srt.runtime_context as rc
    from sglang.srt.model_executor.runner import decode_cuda_graph_runner as runner
    from sglang.srt.plugins import load_plugins

    load_plugins()
    monkeypatch.setattr(rc, "get_server_args", lambda: SimpleNamespace(
        dllm_algorithm="FastDVLMSpeculative", dllm_algorithm_config=_write_yaml(tmp_path, "cuda_graph: true\n")))
    assert isinstance(runner.create_attention_graph_variants(SimpleNamespace(architectures=[ARCHITECTURE])),
                      am.SpecAttentionModes)
    assert runner.create_attention_graph_variants(SimpleNamespace(architectures=["NoSuchArch"])) is None


def test_graph_runner_without_a_causal_capture_is_refused():
    am.check_graph_runner(SimpleNamespace(decode_cuda_graph_runner=None))  # eager: fine
    am.check_graph_runner(SimpleNamespace())
    am.check_graph_runner(SimpleNamespace(decode_cuda_graph_runner=SimpleNamespace(
        attention_graph_variants=am.SpecAttentionModes())))
    for runner in (SimpleNamespace(attention_graph_variants=None), object()):
        with pytest.raises(RuntimeError, match="no causal capture"):
            am.check_graph_runner(SimpleNamespace(decode_cuda_graph_runner=runner))


# What SGLang's dLLM resolution (`arg_groups/dllm_hook.py` `handle_dllm_inference`: its
# `_dllm_attention_backend`, then our `configure_server_args`, then its page-size pass) makes of
# the attention backend left by the earlier passes (fa3: SGLang's default on Hopper) and decode
# CUDA graphs on/off. (backend asked, graphs on) -> (backend served, graphs kept) or an error.
MDM = {"flashinfer": "flashinfer", "fa3": "flashinfer", "triton": "triton", "torch_native": "torch_native",
       "fast_dvlm_triton": "fast_dvlm_triton"}
SPEC = {"flashinfer": "flashinfer", "fa3": "triton", "triton": "triton", "torch_native": "torch_native",
        "fast_dvlm_triton": "fast_dvlm_triton"}
RESOLUTION_CASES = (
    [("FastDVLMBlock", None, asked, graphs, MDM[asked], graphs) for asked in MDM for graphs in (True, False)]
    # spec runs its rounds eagerly unless it opted in to its two-capture graphs
    + [("FastDVLMSpeculative", None, asked, graphs, SPEC[asked], False) for asked in SPEC for graphs in (True, False)]
    + [("FastDVLMSpeculative", "cuda_graph: true\n", asked, False, SPEC[asked], False) for asked in SPEC]
    + [("FastDVLMSpeculative", "cuda_graph: true\n", asked, True, served, True)
       for asked, served in (("fa3", "triton"), ("triton", "triton"), ("fast_dvlm_triton", "fast_dvlm_triton"))]
    + [("FastDVLMSpeculative", "cuda_graph: true\n", asked, True, ValueError, None)
       for asked in ("flashinfer", "torch_native")]
)


@pytest.mark.parametrize("algorithm,yaml_text,asked,graphs,served,graphs_kept", RESOLUTION_CASES)
def test_sglang_dllm_resolution_keeps_a_backend_that_serves_our_blocks(sgl_server_args, tmp_path, algorithm,
                                                                       yaml_text, asked, graphs, served, graphs_kept):
    """fa3 has no DLLM_EXTEND metadata and used to survive with graphs off; a user's triton used to
    be replaced by flashinfer with graphs on; spec's graphs need the backend whose DLLM_EXTEND
    metadata lives in buffers refreshed at every replay (triton), not flashinfer's per-capture plans."""
    from sglang.srt.arg_groups.dllm_hook import handle_dllm_inference
    from sglang.srt.arg_groups.overrides import resolving_view
    from sglang.srt.model_executor.cuda_graph_config import Backend

    path = None if yaml_text is None else _write_yaml(tmp_path, yaml_text)
    sa = sgl_server_args(algorithm=algorithm, dllm_algorithm_config=path, attention_backend=asked, graphs=graphs)
    if served is ValueError:
        with pytest.raises(ValueError, match="needs --attention-backend triton.*stale"):
            handle_dllm_inference(sa)
        return
    handle_dllm_inference(sa)
    view = resolving_view(sa)
    assert view.attention_backend == served
    assert {view.prefill_attention_backend, view.decode_attention_backend} <= {None, served}
    assert (view.cuda_graph_config.decode.backend != Backend.DISABLED) == graphs_kept
    assert view.disable_radix_cache is False and view.chunked_prefill_size != -1  # both stay SGLang's


def test_dllm_resolution_reads_our_declarations():
    """Source pin: the resolution reads exactly the class attributes our algorithms declare."""
    import inspect

    from sglang.srt.arg_groups.overrides import _dllm_attention_backend

    from fast_dvlm_sglang.sglang_plugin.algorithm import FastDVLMBlock
    from fast_dvlm_sglang.sglang_plugin.speculative import FastDVLMSpeculative

    source = inspect.getsource(_dllm_attention_backend)
    assert "algorithm_cls.supported_attention_backends" in source and "algorithm_cls.required_attention_backend" in source
    for cls in (FastDVLMBlock, FastDVLMSpeculative):
        assert cls.required_attention_backend in cls.supported_attention_backends
        assert "fa3" not in cls.supported_attention_backends


@pytest.fixture
def sgl_server_args(tiny_checkpoints):
    """ServerArgs as the resolution pipeline hands them to its dLLM pass (page size resolved)."""
    from sglang.srt.model_executor.cuda_graph_config import (
        Backend,
        Phase,
        default_cuda_graph_config,
        with_phase,
    )
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import ServerArgs

    load_plugins()

    def make(algorithm="FastDVLMSpeculative", graphs=True, **kwargs):
        graph_config = default_cuda_graph_config()
        if not graphs:
            graph_config = with_phase(graph_config, Phase.DECODE, backend=Backend.DISABLED)
        kwargs.setdefault("page_size", 1)
        sa = ServerArgs(model_path=str(tiny_checkpoints["new"]), dllm_algorithm=algorithm,
                        cuda_graph_config=graph_config, **kwargs)
        assert (sa.cuda_graph_config.decode.backend != Backend.DISABLED) == graphs
        return sa

    return make


# ---- the radix cache: page size and match granularity (`prefix_cache.py`) -----------------------
@pytest.mark.parametrize("algorithm", ["FastDVLMBlock", "FastDVLMSpeculative"])
@pytest.mark.parametrize("page_size,served", [(1, 1), (4, 4), (32, 32), (64, 32)])
def test_page_size_is_kept_up_to_the_block_size_with_the_radix_cache(sgl_server_args, algorithm, page_size,
                                                                     served):
    """SGLang sets a dLLM server's page size to the block size when the radix cache is on; for
    our algorithms (no bidirectional KV ever in the tree) the user's page size stays, capped at
    the block size (32 for the tiny checkpoint) as SGLang caps it."""
    from sglang.srt.arg_groups.dllm_hook import handle_dllm_inference
    from sglang.srt.arg_groups.overrides import resolving_view

    sa = sgl_server_args(algorithm=algorithm, graphs=False, page_size=page_size)
    handle_dllm_inference(sa)
    view = resolving_view(sa)
    assert view.disable_radix_cache is False and view.page_size == served


def test_other_dllm_algorithms_keep_sglangs_page_size_rule():
    """The hook leaves SGLang's rule (page size = block size with the radix cache) to the others."""
    from types import SimpleNamespace

    from fast_dvlm_sglang.sglang_plugin.prefix_cache import dllm_page_size

    seen = []
    view = SimpleNamespace(dllm_algorithm="LowConfidence", page_size=1)
    assert dllm_page_size(lambda v: seen.append(v) or {"page_size": 32}, view) == {"page_size": 32}
    assert seen == [view]


@pytest.mark.parametrize("algorithm,max_prefix,with_logprobs", [
    ("FastDVLMSpeculative", 44, 10), ("FastDVLMBlock", 44, 10), ("LowConfidence", 32, 0)])
def test_prefix_match_is_as_fine_as_ars_for_our_algorithms(sgl_server_args, algorithm, max_prefix, with_logprobs):
    """A 45-token prompt, block 32: SGLang's dLLM rule rounds the longest match down to one block
    (32); ours may match 44 tokens (all but the last, whose logits give the first token), as AR."""
    from array import array

    from sglang.srt.dllm.config import DllmConfig
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    sp = SamplingParams(max_new_tokens=8)
    sp.normalize(None)
    cfg = DllmConfig(algorithm, {}, 32, 99, 4, first_done_first_out_mode=True,
                     requires_separate_context_encoding=True)
    req = Req("r", "", array("q", range(45)), sp, dllm_config=cfg, vocab_size=128)
    req._init_fill_ids_for_dllm()
    assert req._compute_max_prefix_len(len(req.full_untruncated_fill_ids)) == max_prefix
    req.return_logprob, req.logprob_start_len = True, 10  # logprobs from token 10: its logits are needed
    assert req._compute_max_prefix_len(len(req.full_untruncated_fill_ids)) == with_logprobs
