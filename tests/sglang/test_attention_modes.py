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

    from fast_dvlm_sglang.sglang_plugin.model import ModeSelectedAttention

    layer = ModeSelectedAttention(RecordingAttention())
    assert layer.layer_id == 3 and layer.bidirectional.layer_id == 3  # same KV pages
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


@pytest.mark.parametrize("yaml_text,backend,graphs_kept", [
    (None, None, False),
    ("cuda_graph: false\n", None, False),
    ("cuda_graph: true\n", None, True),
    ("cuda_graph: true\n", "flashinfer", True),
])
def test_configure_server_args_keeps_graphs_only_when_opted_in(sgl_server_args, tmp_path, yaml_text, backend, graphs_kept):
    from sglang.srt.model_executor.cuda_graph_config import Backend

    from fast_dvlm_sglang.sglang_plugin.speculative import FastDVLMSpeculative

    path = None if yaml_text is None else _write_yaml(tmp_path, yaml_text)
    sa = sgl_server_args(dllm_algorithm_config=path, attention_backend=backend)
    FastDVLMSpeculative.configure_server_args(sa)
    decided = {k: v for _, fields in sa._resolved_overrides for k, v in fields.items()}
    assert decided["disable_radix_cache"] is True and decided["chunked_prefill_size"] == -1
    assert ("cuda_graph_config" not in decided) == graphs_kept
    if not graphs_kept:
        assert decided["cuda_graph_config"].decode.backend == Backend.DISABLED


def test_cuda_graph_opt_in_refuses_a_backend_without_our_variants(sgl_server_args, tmp_path):
    from fast_dvlm_sglang.sglang_plugin.speculative import FastDVLMSpeculative

    sa = sgl_server_args(dllm_algorithm_config=_write_yaml(tmp_path, "cuda_graph: true\n"),
                         attention_backend="triton")
    with pytest.raises(ValueError, match="needs the flashinfer attention backend"):
        FastDVLMSpeculative.configure_server_args(sa)


@pytest.fixture
def sgl_server_args(tiny_checkpoints):
    from sglang.srt.model_executor.cuda_graph_config import Backend, default_cuda_graph_config
    from sglang.srt.server_args import ServerArgs

    def make(**kwargs):
        sa = ServerArgs(model_path=str(tiny_checkpoints["new"]), dllm_algorithm="FastDVLMSpeculative",
                        cuda_graph_config=default_cuda_graph_config(), **kwargs)
        assert sa.cuda_graph_config.decode.backend != Backend.DISABLED
        return sa

    return make
