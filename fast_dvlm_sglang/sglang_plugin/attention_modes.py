"""Which attention a `DLLM_EXTEND` forward of our model runs, eagerly and under CUDA graphs.

A speculative round runs the same block twice: the draft block-bidirectionally, the verify
causally. Eagerly the choice is a Python decision per forward (`causal_pass()`); a captured CUDA
graph would freeze whichever mode ran at capture. SGLang's decode graph runner already captures
several graphs per batch size when the attention needs them (`AttentionGraphVariants`, as DSA
captures dense + sparse): `SpecAttentionModes` asks it for one bidirectional and one causal
capture, and picks the causal one for a forward inside `causal_pass()`.

Opt-in (`cuda_graph: true` in the `--dllm-algorithm-config` YAML, `fast-dvlm serve
--spec-cuda-graph`): the two-capture path has CPU tests of its selection logic but has not run
on a GPU with SGLang yet, so the default stays the eager path that is tested end to end.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import ClassVar

BIDIRECTIONAL = "fast_dvlm_bidirectional"
CAUSAL = "fast_dvlm_causal"

# A causal forward inside a DLLM_EXTEND batch (the speculative verify pass). A context variable,
# not a ForwardBatch attribute: SGLang's runners hand the model a `dataclasses.replace` copy of the
# batch (model_executor/runner/eager_runner.py `load_batch`), which drops non-field attributes.
_CAUSAL_PASS: ContextVar[bool] = ContextVar("fast_dvlm_causal_pass", default=False)


@contextmanager
def causal_pass() -> Iterator[None]:
    """Forwards run inside this block attend causally even in `DLLM_EXTEND` mode."""
    token = _CAUSAL_PASS.set(True)
    try:
        yield
    finally:
        _CAUSAL_PASS.reset(token)


def runs_bidirectional(forward_batch) -> bool:
    """The attention of this forward: bidirectional within the block for `DLLM_EXTEND`, except in
    the verify pass; while SGLang captures one of our graph variants, the variant decides."""
    from sglang.srt.model_executor.runner_utils.capture_mode import get_capture_attention_variant

    capturing = get_capture_attention_variant()
    if capturing in (BIDIRECTIONAL, CAUSAL):
        return capturing == BIDIRECTIONAL
    return forward_batch.forward_mode.is_dllm_extend() and not _CAUSAL_PASS.get()


@dataclass(frozen=True)
class SpecAttentionModes:
    """SGLang `AttentionGraphVariants`: two captures per batch size, picked per forward."""

    capture_labels: ClassVar[tuple[str, ...]] = (BIDIRECTIONAL, CAUSAL)

    def select(self, forward_batch) -> str:
        return CAUSAL if _CAUSAL_PASS.get() else BIDIRECTIONAL


def algorithm_config(path: str | None) -> dict:
    """The `--dllm-algorithm-config` YAML mapping ({} without one)."""
    if path is None:
        return {}
    import yaml

    with open(path) as f:
        config = yaml.safe_load(f) or {}
    if not isinstance(config, dict):
        raise ValueError(f"the dLLM algorithm config {path} must be a YAML mapping")
    return config


def wants_graph_variants(server_args) -> bool:
    """Our architecture served by `FastDVLMSpeculative` with `cuda_graph: true`."""
    from . import SPEC_ALGORITHM_NAME

    if getattr(server_args, "dllm_algorithm", None) != SPEC_ALGORITHM_NAME:
        return False
    return bool(algorithm_config(getattr(server_args, "dllm_algorithm_config", None)).get("cuda_graph", False))


def create_attention_graph_variants(original, hf_config):
    """AROUND hook on the decode graph runner's variant factory: ours for opted-in spec serving."""
    from fast_dvlm_sglang.config import ARCHITECTURE

    if ARCHITECTURE in (getattr(hf_config, "architectures", None) or []):
        from sglang.srt.runtime_context import get_server_args

        if wants_graph_variants(get_server_args()):
            return SpecAttentionModes()
    return original(hf_config)


def check_graph_runner(model_runner) -> None:
    """Refuse to run rounds through a graph runner that would replay one attention mode for both
    passes (a CPU graph runner, or a backend with its own dLLM graph variants)."""
    runner = getattr(model_runner, "decode_cuda_graph_runner", None)
    if runner is not None and not isinstance(getattr(runner, "attention_graph_variants", None),
                                             SpecAttentionModes):
        raise RuntimeError(
            "FastDVLMSpeculative: the decode graph runner has no causal capture for the verify "
            f"pass ({type(runner).__name__}); set `cuda_graph: true` in --dllm-algorithm-config "
            "with the flashinfer backend, or serve with --disable-cuda-graph"
        )
