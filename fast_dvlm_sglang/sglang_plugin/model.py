"""Fast-dVLM as an SGLang model: SGLang's Qwen2.5-VL, subclassed (nothing copied).

What the subclass adds:
- full logits for dLLM block forwards: `LogitsProcessor(config, return_full_logits=True)`, which
  SGLang only honours in `ForwardMode.DLLM_EXTEND` (sglang/srt/layers/logits_processor.py), so
  the AR path and the causal context pass still compute last-position logits only;
- the hidden states of dLLM block forwards, when the server captures them
  (`--enable-return-hidden-states`; `BlockLogitsProcessor`): SGLang's DLLM_EXTEND branch returns
  the full logits alone, and spec returns each committed token's hidden state from its verify
  row, as AR returns the decode step's;
- the attention mode chosen per forward (`mode_selected`): every text layer's `RadixAttention`
  runs through a bidirectional view of itself (`attn_type=AttentionType.ENCODER_ONLY`, every
  other attribute read live from the layer, same `layer_id` and KV pages) for `DLLM_EXTEND`
  forwards (a block attends to itself bidirectionally and to its cached context) and causally
  otherwise (prompt/context encoding, AR decode, and `DLLM_EXTEND` forwards run inside
  `causal_pass()`: the speculative verify pass; under CUDA graphs, one capture per mode,
  `attention_modes.py`). No layer object is mutated per forward;
- M-RoPE positions for extend forwards that run past the prompt (a dLLM block, or the causal pass
  over a committed block): SGLang slices the prompt's precomputed table, which ends at the prompt;
  text positions after it are `position + mrope_position_delta`, as in AR decoding;
- weight loading for both checkpoint layouts (`model.language_model.*`/`model.visual.*`/
  `lm_head.*` and `model.*`/`visual.*`/`lm_head.*`), tied or untied embeddings, with a strict
  check that every checkpoint tensor lands in a parameter and every parameter is written.

With no `--dllm-algorithm` the class is a plain autoregressive Qwen2.5-VL (the AR baseline).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from sglang.srt.layers.logits_processor import LogitsProcessor
from sglang.srt.layers.radix_attention import AttentionType
from sglang.srt.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from torch import nn

from fast_dvlm_sglang.config import ARCHITECTURE

from .attention_modes import runs_bidirectional

_TEXT_STACKED = ((".q_proj.", ".qkv_proj."), (".k_proj.", ".qkv_proj."), (".v_proj.", ".qkv_proj."))
_MLP_STACKED = ((".gate_proj.", ".gate_up_proj."), (".up_proj.", ".gate_up_proj."))
# KV-cache scales: checkpoints (llmcompressor's kv_cache_scheme, modelopt) store them on the
# attention block or its k/v projections; SGLang keeps them on the RadixAttention (`attn`).
_KV_SCALES = tuple((f".self_attn{proj}.{name}", f".self_attn.attn.{name}")
                   for name in ("k_scale", "v_scale") for proj in ("", ".k_proj", ".v_proj", ".attn"))


class _BidirectionalView:
    """Mixin of the bidirectional view of one causal attention layer (see `mode_selected`).

    The view's instance dict holds only the layer it views; every other attribute is read from
    (and written to) that layer at the time of use, so whatever SGLang sets on the layer after
    loading (`k_scale_float` / `v_scale_float` of an FP8 KV cache, a quant method's state, ...)
    is what the view sees. `attn_type` alone is the view's own: a class attribute, found because
    the instance dict has no entry of that name.
    """

    attn_type = AttentionType.ENCODER_ONLY

    def __init__(self, causal: nn.Module) -> None:  # no Module.__init__: the state is the layer's
        object.__setattr__(self, "_viewed", causal)

    def __getattr__(self, name: str):
        return getattr(object.__getattribute__(self, "_viewed"), name)

    def __setattr__(self, name: str, value) -> None:
        setattr(object.__getattribute__(self, "_viewed"), name, value)

    def __delattr__(self, name: str) -> None:
        delattr(object.__getattribute__(self, "_viewed"), name)


def _mode_selected_forward(self, q, k, v, forward_batch, *args, **kwargs):
    if runs_bidirectional(forward_batch):
        return self._fast_dvlm_bidirectional(q, k, v, forward_batch, *args, **kwargs)
    return type(self)._fast_dvlm_causal_forward(self, q, k, v, forward_batch, *args, **kwargs)


_MODE_SELECTED_CLASSES: dict[type, type] = {}


def _classes_for(cls: type) -> tuple[type, type]:
    """(mode-selected class, view class) for an attention class, made once per class."""
    if cls not in _MODE_SELECTED_CLASSES:
        view = type(f"Bidirectional{cls.__name__}", (_BidirectionalView, cls), {})
        selected = type(f"ModeSelected{cls.__name__}", (cls,), {
            "forward": _mode_selected_forward, "_fast_dvlm_causal_forward": cls.forward,
            "_fast_dvlm_view_class": view,
        })
        _MODE_SELECTED_CLASSES[cls] = selected
    selected = _MODE_SELECTED_CLASSES[cls]
    return selected, selected._fast_dvlm_view_class


def is_mode_selected(attn: nn.Module) -> bool:
    return hasattr(type(attn), "_fast_dvlm_causal_forward")


def mode_selected(attn: nn.Module) -> nn.Module:
    """Make a causal `RadixAttention` choose its attention mode per forward (idempotent).

    The layer stays where it is, with its own class's behaviour and its parameter names
    (`...self_attn.attn.k_scale` loads as for SGLang's Qwen2.5-VL): only its class becomes a
    subclass whose `forward` runs the layer itself (causal) or, for `DLLM_EXTEND` forwards outside
    `causal_pass()`, its bidirectional view: the same object seen with
    `attn_type=AttentionType.ENCODER_ONLY` (SGLang's bidirectional marker, as SDAR uses), sharing
    `layer_id` and so the same KV pages. One class change at model construction; no layer object
    is mutated per forward.
    """
    if is_mode_selected(attn):
        return attn
    selected, view_cls = _classes_for(type(attn))
    attn.__class__ = selected
    # Not a submodule: SGLang sees one attention layer per layer_id.
    attn.__dict__["_fast_dvlm_bidirectional"] = view_cls(attn)
    return attn


def is_kv_scale(key: str) -> bool:
    return key.endswith((".k_scale", ".v_scale")) and ".self_attn" in key


def sglang_param_name(key: str) -> str | None:
    """The SGLang parameter a checkpoint tensor loads into (None: not a weight, e.g. inv_freq)."""
    if "rotary_emb.inv_freq" in key:
        return None
    key = _sglang_checkpoint_name(key)
    if key.startswith("visual."):
        key = key.replace(".attn.qkv.", ".attn.qkv_proj.")
    else:
        for a, b in _TEXT_STACKED:
            key = key.replace(a, b)
    for a, b in _MLP_STACKED:
        key = key.replace(a, b)
    return key


def _sglang_checkpoint_name(key: str) -> str:
    """The name SGLang's Qwen2.5-VL `load_weights` expects (old layout, unfused names; KV-cache
    scales already under `attn`, since SGLang's loader takes unknown names literally)."""
    if key.startswith("model.language_model."):
        key = "model." + key[len("model.language_model."):]
    elif key.startswith("model.visual."):
        key = "visual." + key[len("model.visual."):]
    if is_kv_scale(key):
        for a, b in _KV_SCALES:
            if key.endswith(a):
                return key[: -len(a)] + b
    return key


def copy_to_device(host: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device` without a sync: pinned first on CUDA (a `non_blocking` copy from
    pageable memory is staged synchronously by the driver)."""
    device = torch.device(device)
    if device.type == "cpu":
        return host
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


# Set while our dLLM algorithms run their forwards: they prepared the M-RoPE positions once for
# the round, so the model's forward does not recompute them (a context variable, as
# `attention_modes.causal_pass`: SGLang's runners hand the model a copy of the batch).
_INPUTS_PREPARED: ContextVar[bool] = ContextVar("fast_dvlm_inputs_prepared", default=False)


@contextmanager
def inputs_prepared() -> Iterator[None]:
    token = _INPUTS_PREPARED.set(True)
    try:
        yield
    finally:
        _INPUTS_PREPARED.reset(token)


def mrope_delta(mm) -> int:
    # mrope_position_delta is a host tensor (set by the processor): no device sync.
    if mm is None or getattr(mm, "mrope_position_delta", None) is None:
        return 0
    return int(torch.as_tensor(mm.mrope_position_delta).reshape(-1)[0])


def set_extend_mrope_positions(forward_batch) -> None:
    """M-RoPE positions of extend forwards that run past the prompt (a dLLM block, or the causal
    pass over committed tokens): SGLang slices the prompt's precomputed table, which ends at the
    prompt, and falls back to one column per request; text positions after the prompt are
    `position + mrope_position_delta`, as in AR decoding.

    Our dLLM algorithms call this once per round, before `model_runner.forward` (its eager/graph
    runners copy `mrope_positions` into static buffers sized by the token count, which the
    fallback breaks for a batch), and run their forwards inside `inputs_prepared()`; the model's
    forward calls it for other callers.
    """
    mode = forward_batch.forward_mode
    if forward_batch.mrope_positions is None or mode.is_decode() or not (mode.is_extend() or mode.is_dllm_extend()):
        return
    mm_inputs = getattr(forward_batch, "mm_inputs", None)
    lens = getattr(forward_batch, "extend_seq_lens_cpu", None)
    if not mm_inputs or lens is None or all(mm is None for mm in mm_inputs):
        return
    pos = forward_batch.positions.to(torch.long)
    if mode.is_dllm_extend():
        # A block starts at or after the end of its prompt: every position is past the table.
        deltas = torch.repeat_interleave(torch.tensor([mrope_delta(mm) for mm in mm_inputs], dtype=torch.long),
                                         torch.tensor(list(lens), dtype=torch.long))
        forward_batch.mrope_positions = (pos + copy_to_device(deltas, pos.device)).unsqueeze(0).repeat(3, 1)
        return
    out = pos.unsqueeze(0).repeat(3, 1)
    start = 0
    for mm, n in zip(mm_inputs, lens):
        if mm is not None and getattr(mm, "mrope_positions", None) is not None and n > 0:
            seg = pos[start:start + n]
            table = mm.mrope_positions.to(device=pos.device, dtype=torch.long)
            inside = seg < table.shape[1]
            from_table = table[:, seg.clamp(max=table.shape[1] - 1)]
            out[:, start:start + n] = torch.where(inside.unsqueeze(0), from_table,
                                                  (seg + mrope_delta(mm)).unsqueeze(0))
        start += n
    forward_batch.mrope_positions = out


def prepare_block_embeds(model_runner, forward_batch) -> None:
    """The token embeddings of a `DLLM_EXTEND` batch, for SGLang's decode CUDA graphs.

    SGLang's decode graph runner feeds algorithms with `requires_separate_context_encoding`
    (ours) their embeddings through a static buffer: it captures the model with
    `input_embeds=buffers.input_embeds[:n]` and, at replay, copies `forward_batch.input_embeds`
    into that buffer, refusing a batch without them ("Diffusion graph replay requires prepared
    input embeddings", model_executor/runner/decode_cuda_graph_runner.py, `load_batch`). A
    block holds only text (seed, masks, drafts), so its embeddings are the token embeddings.
    Call after the block's input ids are final for the next forward. Without a decode graph
    runner (eager serving, the CPU) nothing is needed: the model embeds the ids itself.
    """
    if getattr(model_runner, "decode_cuda_graph_runner", None) is None:
        return
    forward_batch.input_embeds = model_runner.model.get_input_embeddings()(forward_batch.input_ids)


class BlockLogitsProcessor(LogitsProcessor):
    """SGLang's LogitsProcessor with full logits for DLLM_EXTEND forwards (`return_full_logits`),
    and, when the forward captures hidden states (the server's `--enable-return-hidden-states`
    sets `capture_hidden_mode` on every forward), the block's hidden states with them: every
    position, final norm applied, as SGLang's FULL capture of an extend (the speculative verify
    pass reads the committed positions' rows, `speculative.py`)."""

    def __init__(self, config) -> None:
        super().__init__(config, return_full_logits=True)

    def forward(self, input_ids, hidden_states, lm_head, logits_metadata, *args, **kwargs):
        out = super().forward(input_ids, hidden_states, lm_head, logits_metadata, *args, **kwargs)
        mode = getattr(logits_metadata, "capture_hidden_mode", None)
        if (logits_metadata.forward_mode.is_dllm_extend() and mode is not None and mode.need_capture()
                and out.hidden_states is None):
            out.hidden_states = hidden_states
        return out


class Fast_dVLMForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):  # noqa: N801 (HF arch name)
    def __init__(self, config, quant_config=None, prefix: str = "") -> None:
        super().__init__(config, quant_config=quant_config, prefix=prefix)
        self.logits_processor = BlockLogitsProcessor(config)
        if not getattr(config, "encoder_only", False):
            for layer in self.model.layers:
                attn = getattr(getattr(layer, "self_attn", None), "attn", None)
                if attn is not None:
                    mode_selected(attn)
        self.load_report: dict | None = None

    @torch.no_grad()
    def forward(self, input_ids, positions, forward_batch, input_embeds=None, get_embedding=False,
                pp_proxy_tensors=None):
        if self.is_mrope_enabled and not _INPUTS_PREPARED.get():
            set_extend_mrope_positions(forward_batch)
        if input_embeds is not None and forward_batch.forward_mode.is_dllm_extend() and not get_embedding:
            return self._forward_block_embeds(input_ids, forward_batch, input_embeds)
        # Qwen2.5-VL's forward embeds `input_ids` itself (images included) and ignores `input_embeds`.
        return super().forward(input_ids, positions, forward_batch, input_embeds=input_embeds,
                               get_embedding=get_embedding, pp_proxy_tensors=pp_proxy_tensors)

    def get_image_feature(self, items):
        from . import metrics

        metrics.record_vision_images(sum(int(item.image_grid_thw.shape[0]) for item in items))
        return super().get_image_feature(items)

    def get_video_feature(self, items):
        """Video features as Qwen2.5-VL computes them: each temporal patch its own full-attention
        span. SGLang 0.5.23's Qwen2.5-VL vision tower takes a clip's whole t*h*w as one span
        (`Qwen2_5_VisionTransformer.forward`, its `cu_seqlens`; its Qwen2-VL tower and
        transformers' take h*w per temporal patch), so frames would attend across time; the same
        grid as t rows of (1, h, w) gives the original spans, rotary positions and windows."""
        from sglang.srt.multimodal.mm_utils import run_dp_sharded_mrope_vision_model

        from . import metrics

        pixel_values = torch.cat([item.feature for item in items], dim=0).type(self.visual.dtype)
        grid = torch.cat([item.video_grid_thw for item in items], dim=0)
        per_patch = torch.repeat_interleave(grid, grid[:, 0], dim=0)
        per_patch[:, 0] = 1
        metrics.record_vision_videos(int(grid.shape[0]))
        if self.use_data_parallel:
            return run_dp_sharded_mrope_vision_model(self.visual, pixel_values, per_patch.tolist(),
                                                     rope_type="rope_3d")
        return self.visual(pixel_values, grid_thw=per_patch)

    def _forward_block_embeds(self, input_ids, forward_batch, input_embeds):
        """A dLLM block from its token embeddings (`prepare_block_embeds`): the graph-captured
        path, where the embeddings come from SGLang's static buffer."""
        positions = forward_batch.mrope_positions if self.is_mrope_enabled else forward_batch.positions
        embeds = input_embeds.to(self.model.embed_tokens.weight.dtype)  # SGLang's eager path casts to bf16
        hidden = self.model(input_ids=None, positions=positions, forward_batch=forward_batch, input_embeds=embeds)
        return self.logits_processor(input_ids, hidden, self.lm_head, forward_batch)

    # ---- weights ---------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]):
        params = dict(self.named_parameters(remove_duplicate=False))
        tied = bool(getattr(self.config, "tie_word_embeddings", False))
        written: set[str] = set()
        unused: list[str] = []
        ignored_kv_scales: list[str] = []

        def renamed():
            for key, tensor in weights:
                target = sglang_param_name(key)
                if target is None:
                    continue
                if target not in params:
                    # Calibrated KV scales with an unquantized KV cache: nothing to load them into
                    # (SGLang's own loaders skip them too); anything else is a mismatch.
                    (ignored_kv_scales if is_kv_scale(key) else unused).append(key)
                    continue
                written.add(target)
                yield _sglang_checkpoint_name(key), tensor

        super().load_weights(renamed())
        # Parameters SGLang allows a checkpoint to omit (KV-cache scales default to 1.0).
        expected = {name for name, p in params.items() if not getattr(p, "_skip_weight_check", False)}
        if tied:
            expected.discard("lm_head.weight")
        missing = sorted(expected - written)
        self.load_report = {"written": len(written), "unused": unused, "missing": missing,
                            "ignored_kv_scales": ignored_kv_scales}
        if unused or missing:
            raise ValueError(
                f"{ARCHITECTURE}: checkpoint/model mismatch: unused checkpoint tensors {unused[:8]}"
                f"{'...' if len(unused) > 8 else ''}; parameters never written {missing[:8]}"
                f"{'...' if len(missing) > 8 else ''}"
            )



