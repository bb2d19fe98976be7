"""Fast-dVLM as an SGLang model: SGLang's Qwen2.5-VL, subclassed (nothing copied).

What the subclass adds:
- full logits for dLLM block forwards: `LogitsProcessor(config, return_full_logits=True)`, which
  SGLang only honours in `ForwardMode.DLLM_EXTEND` (sglang/srt/layers/logits_processor.py), so
  the AR path and the causal context pass still compute last-position logits only;
- the attention mode chosen per forward: every text layer's `RadixAttention` gets a twin with
  `attn_type=AttentionType.ENCODER_ONLY` (SGLang's bidirectional marker, as SDAR uses) sharing its
  `layer_id` (so the same KV pages); `ModeSelectedAttention` calls the twin for `DLLM_EXTEND`
  forwards (a block attends to itself bidirectionally and to its cached context) and the causal
  layer otherwise (prompt/context encoding, AR decode, and `DLLM_EXTEND` forwards run inside
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

from collections.abc import Iterable

import torch
from sglang.srt.layers.logits_processor import LogitsProcessor
from sglang.srt.layers.radix_attention import AttentionType
from sglang.srt.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from torch import nn

from fast_dvlm_sglang.config import ARCHITECTURE

from .attention_modes import runs_bidirectional

_TEXT_STACKED = ((".q_proj.", ".qkv_proj."), (".k_proj.", ".qkv_proj."), (".v_proj.", ".qkv_proj."))
_MLP_STACKED = ((".gate_proj.", ".gate_up_proj."), (".up_proj.", ".gate_up_proj."))


class ModeSelectedAttention(nn.Module):
    """Causal `RadixAttention` plus an ENCODER_ONLY twin used for `DLLM_EXTEND` forwards."""

    def __init__(self, causal: nn.Module) -> None:
        super().__init__()
        self.causal = causal
        twin = object.__new__(type(causal))
        twin.__dict__.update(causal.__dict__)  # shares buffers/params dicts: same layer, other mask
        twin.attn_type = AttentionType.ENCODER_ONLY
        # Not registered as a submodule: SGLang sees one attention layer per layer_id.
        self.__dict__["bidirectional"] = twin

    def forward(self, q, k, v, forward_batch, *args, **kwargs):
        layer = self.bidirectional if runs_bidirectional(forward_batch) else self.causal
        return layer(q, k, v, forward_batch, *args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["causal"], name)


def sglang_param_name(key: str) -> str | None:
    """The SGLang parameter a checkpoint tensor loads into (None: not a weight, e.g. inv_freq)."""
    if "rotary_emb.inv_freq" in key:
        return None
    if key.startswith("model.language_model."):
        key = "model." + key[len("model.language_model."):]
    elif key.startswith("model.visual."):
        key = "visual." + key[len("model.visual."):]
    if key.startswith("visual."):
        key = key.replace(".attn.qkv.", ".attn.qkv_proj.")
    else:
        for a, b in _TEXT_STACKED:
            key = key.replace(a, b)
    for a, b in _MLP_STACKED:
        key = key.replace(a, b)
    return key


def _sglang_checkpoint_name(key: str) -> str:
    """The name SGLang's Qwen2.5-VL `load_weights` expects (old layout, unfused names)."""
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    if key.startswith("model.visual."):
        return "visual." + key[len("model.visual."):]
    return key


def set_extend_mrope_positions(forward_batch) -> None:
    """M-RoPE positions of extend forwards that run past the prompt (a dLLM block, or the causal
    pass over committed tokens): SGLang slices the prompt's precomputed table, which ends at the
    prompt, and falls back to one column per request; text positions after the prompt are
    `position + mrope_position_delta`, as in AR decoding.

    Our dLLM algorithms call this before `model_runner.forward` (its eager/graph runners copy
    `mrope_positions` into static buffers sized by the token count, which the fallback breaks for
    a batch), and the model's forward calls it again (idempotent) for other callers.
    """
    mode = forward_batch.forward_mode
    if forward_batch.mrope_positions is None or mode.is_decode() or not (mode.is_extend() or mode.is_dllm_extend()):
        return
    mm_inputs = getattr(forward_batch, "mm_inputs", None)
    lens = getattr(forward_batch, "extend_seq_lens_cpu", None)
    if not mm_inputs or lens is None or all(mm is None for mm in mm_inputs):
        return
    pos = forward_batch.positions.to(torch.long)
    out = pos.unsqueeze(0).repeat(3, 1)
    start = 0
    for mm, n in zip(mm_inputs, lens):
        if mm is not None and getattr(mm, "mrope_positions", None) is not None and n > 0:
            seg = pos[start:start + n]
            table = mm.mrope_positions.to(device=pos.device, dtype=torch.long)
            inside = seg < table.shape[1]
            # mrope_position_delta is a host tensor (set by the processor): no device sync.
            delta = int(torch.as_tensor(mm.mrope_position_delta).reshape(-1)[0])
            from_table = table[:, seg.clamp(max=table.shape[1] - 1)]
            out[:, start:start + n] = torch.where(inside.unsqueeze(0), from_table, (seg + delta).unsqueeze(0))
        start += n
    forward_batch.mrope_positions = out


class Fast_dVLMForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):  # noqa: N801 (HF arch name)
    def __init__(self, config, quant_config=None, prefix: str = "") -> None:
        super().__init__(config, quant_config=quant_config, prefix=prefix)
        self.logits_processor = LogitsProcessor(config, return_full_logits=True)
        if not getattr(config, "encoder_only", False):
            for layer in self.model.layers:
                attn = getattr(getattr(layer, "self_attn", None), "attn", None)
                if attn is not None and not isinstance(attn, ModeSelectedAttention):
                    layer.self_attn.attn = ModeSelectedAttention(attn)
        self.load_report: dict | None = None

    @torch.no_grad()
    def forward(self, input_ids, positions, forward_batch, input_embeds=None, get_embedding=False,
                pp_proxy_tensors=None):
        if self.is_mrope_enabled:
            set_extend_mrope_positions(forward_batch)
        return super().forward(input_ids, positions, forward_batch, input_embeds=input_embeds,
                               get_embedding=get_embedding, pp_proxy_tensors=pp_proxy_tensors)

    # ---- weights ---------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]):
        params = dict(self.named_parameters(remove_duplicate=False))
        tied = bool(getattr(self.config, "tie_word_embeddings", False))
        written: set[str] = set()
        unused: list[str] = []

        def renamed():
            for key, tensor in weights:
                target = sglang_param_name(key)
                if target is None:
                    continue
                if target not in params:
                    unused.append(key)
                    continue
                written.add(target)
                yield _sglang_checkpoint_name(key), tensor

        super().load_weights(renamed())
        expected = set(params)
        if tied:
            expected.discard("lm_head.weight")
        missing = sorted(expected - written)
        self.load_report = {"written": len(written), "unused": unused, "missing": missing}
        if unused or missing:
            raise ValueError(
                f"{ARCHITECTURE}: checkpoint/model mismatch: unused checkpoint tensors {unused[:8]}"
                f"{'...' if len(unused) > 8 else ''}; parameters never written {missing[:8]}"
                f"{'...' if len(missing) > 8 else ''}"
            )



