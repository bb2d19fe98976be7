"""Fast_dVLMForConditionalGeneration in plain PyTorch: the oracle for every other path.

Vision: transformers' Qwen2.5-VL vision tower, unchanged. Language: the Qwen2.5 text tower
(GQA, SwiGLU, RMSNorm, M-RoPE) written out so that every forward takes an explicit boolean
attention mask and explicit 3-D positions; that is what block diffusion needs (causal,
block-bidirectional and the training layout all run through the same code).

Module names match the transformers >= 4.52 checkpoint layout (`model.language_model.*`,
`model.visual.*`, `lm_head.*`), so `state_dict()` keys are the checkpoint keys.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .attention_masks import CAUSAL, mask_kind, tag_mask
from .config import CheckpointError, FastDVLMConfig, TextConfig
from .kv_cache import KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def mrope_cos_sin(cfg: TextConfig, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, T, head_dim] for 3-D positions [3, B, T] (temporal, height, width).

    M-RoPE splits the rotary frequencies into `mrope_section` chunks; chunk i rotates by the
    position on axis i % 3. Text tokens have equal positions on all axes, so for them this is
    plain 1-D RoPE.
    """
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=position_ids.device) / dim))
    freqs = position_ids[..., None].float() * inv_freq  # [3, B, T, dim/2]
    chunks = freqs.split(list(cfg.mrope_section), dim=-1)
    freqs = torch.cat([chunk[i % 3] for i, chunk in enumerate(chunks)], dim=-1)  # [B, T, dim/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


class Attention(nn.Module):
    # Off: SDPA with the explicit mask (the oracle). On (`use_attention_kernel`): causal and
    # block-bidirectional forwards run through our Triton kernel, as the server's backend does.
    attention_kernel = False

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        layer: int,
        cache: KVCache | None,
        write_cache: bool,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, *cos_sin), apply_rope(k, *cos_sin)
        if cache is not None and hasattr(cache, "window"):
            # A preallocated cache (as a serving engine's): the new keys go into their slots and
            # attention reads context + new in place, without concatenating.
            k, v = cache.window(layer, k, v, persist=write_cache)
        else:
            past = cache.read(layer) if cache is not None else None
            if write_cache:
                cache.append(layer, k, v)
            if past is not None:
                k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        kind = mask_kind(mask)
        if self.attention_kernel and kind is not None:
            from .kernels.block_attention import dense_block_attention

            out = dense_block_attention(q, k, v, causal=kind == CAUSAL)  # [b * t, heads, dim]
            return self.o_proj(out.view(b, t, -1))
        groups = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos_sin, mask, layer, cache, write_cache):
        x = x + self.self_attn(self.input_layernorm(x), cos_sin, mask, layer, cache, write_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, position_ids, mask, cache=None, write_cache=False):
        cos_sin = mrope_cos_sin(self.cfg, position_ids, h.dtype)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos_sin, mask, i, cache, write_cache)
        return self.norm(h)


class _Inner(nn.Module):
    def __init__(self, cfg: FastDVLMConfig) -> None:
        super().__init__()
        from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
            Qwen2_5_VisionTransformerPretrainedModel,
        )

        vision_cfg = Qwen2_5_VLVisionConfig(**vision_kwargs(cfg.vision))
        vision_cfg._attn_implementation = "sdpa"
        self.visual = Qwen2_5_VisionTransformerPretrainedModel._from_config(vision_cfg)
        self.language_model = TextModel(cfg.text)


class FastDVLMForConditionalGeneration(nn.Module):
    def __init__(self, cfg: FastDVLMConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = _Inner(cfg)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        if cfg.text.tie_word_embeddings:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight

    @classmethod
    def from_pretrained(
        cls, model_dir: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> FastDVLMForConditionalGeneration:
        from .checkpoint import load_state_dict

        cfg = FastDVLMConfig.from_dir(model_dir)
        return cls.from_state_dict(cfg, lambda model: load_state_dict(model_dir, cfg, model), dtype=dtype, device=device)

    @classmethod
    def from_state_dict(cls, cfg: FastDVLMConfig, state, *, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> FastDVLMForConditionalGeneration:
        """The model of `cfg` holding `state` (tensors are adopted, not copied); `state` may be a
        function of the empty model (`checkpoint.load_state_dict` checks keys against it)."""
        with torch.device("meta"):
            model = cls(cfg)
            fp8 = _fp8_layout(model, cfg)
        model.load_state_dict(state(model) if callable(state) else state, strict=True, assign=True)
        if cfg.text.tie_word_embeddings:
            model.lm_head.weight = model.model.language_model.embed_tokens.weight
        _rebuild_meta_buffers(model)
        model = model.to(device=device)
        if fp8:  # float8 weights and float32 scales keep their dtypes; the rest becomes `dtype`
            for module in model.modules():
                for name, param in module.named_parameters(recurse=False):
                    if param.dtype != torch.float8_e4m3fn and name != "weight_scale":
                        param.data = param.data.to(dtype)
            return model.eval()
        return model.to(dtype=dtype).eval()

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def use_attention_kernel(self, enabled: bool = True) -> FastDVLMForConditionalGeneration:
        """Run the text tower's causal and block-bidirectional attention through the Triton kernel
        (`kernels/block_attention.py`; on a CPU only inside Triton's interpreter)."""
        for module in self.modules():
            if isinstance(module, Attention):
                module.attention_kernel = enabled
        return self

    # ---- inputs -------------------------------------------------------------------------------
    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings [B, T, H] with image (video) features scattered onto the image (video)
        pad tokens; frames go through the same vision tower as images, as in Qwen2.5-VL."""
        h = self.model.language_model.embed_tokens(input_ids)
        for what, token, pixels, grid in (("image", self.config.image_token_id, pixel_values, image_grid_thw),
                                          ("video", self.config.video_token_id, pixel_values_videos, video_grid_thw)):
            if pixels is None:
                continue
            features = self.model.visual(pixels.to(h.dtype), grid_thw=grid).pooler_output
            is_pad = input_ids == token
            if int(is_pad.sum()) != features.shape[0]:
                raise ValueError(
                    f"{int(is_pad.sum())} {what} tokens in the prompt but {features.shape[0]} {what} features"
                )
            h = h.masked_scatter(is_pad[..., None], features.to(h.dtype))
        return h

    def rope_positions(self, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None = None,
                       video_grid_thw: torch.Tensor | None = None, second_per_grid_ts=None) -> torch.Tensor:
        """3-D M-RoPE positions [3, B, T] of a prompt (Qwen2.5-VL's rule, `mrope_positions`)."""
        return mrope_positions(input_ids, image_grid_thw, self.config, video_grid_thw, second_per_grid_ts)

    # ---- forward ------------------------------------------------------------------------------
    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: KVCache | None = None,
        write_cache: bool = False,
    ) -> torch.Tensor:
        """Logits [B, T, V] for `inputs_embeds` at `position_ids` [3, B, T].

        `attention_mask` is boolean [T, S] or [B, 1, T, S] with S = cached + T (True = attend).
        With `write_cache` the new keys/values are appended to `cache`.
        """
        if attention_mask.dim() == 2:
            attention_mask = tag_mask(attention_mask[None, None], mask_kind(attention_mask))
        h = self.model.language_model(inputs_embeds, position_ids, attention_mask, cache, write_cache)
        return self.lm_head(h)


_VISION_KEYS = {
    "depth", "hidden_size", "hidden_act", "intermediate_size", "num_heads", "in_channels", "patch_size",
    "spatial_merge_size", "temporal_patch_size", "tokens_per_second", "window_size", "out_hidden_size",
    "fullatt_block_indexes", "initializer_range",
}


def vision_kwargs(vision: dict) -> dict:
    """The checkpoint's vision_config as transformers' Qwen2_5_VLVisionConfig arguments
    (Qwen2.5-VL-3B's config spells `in_channels` as `in_chans`)."""
    out = {k: v for k, v in vision.items() if k in _VISION_KEYS}
    if "in_chans" in vision:
        out.setdefault("in_channels", vision["in_chans"])
    return out


def _fp8_layout(model: nn.Module, cfg: FastDVLMConfig) -> bool:
    """A W8A8 FP8 checkpoint (`quantize/scheme.py`): its quantized linears become `FP8Linear`."""
    from .quantize.scheme import (
        UnsupportedQuantization,
        quantization_config,
        quantized_linear_names,
        swap_in_fp8,
    )

    try:
        qconfig = quantization_config(cfg.raw)
    except UnsupportedQuantization as e:
        raise CheckpointError(str(e)) from None
    if qconfig is None:
        return False
    swap_in_fp8(model, quantized_linear_names(model, qconfig))
    return True


def _rebuild_meta_buffers(model: nn.Module) -> None:
    # Non-persistent buffers (transformers' vision rotary frequencies) are not in the checkpoint,
    # so meta-device construction left them empty; rebuild those small modules on the CPU.
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            with torch.device("cpu"):
                fresh = type(module)(module.config)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, fresh)


def mrope_positions(input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None, cfg: FastDVLMConfig,
                    video_grid_thw: torch.Tensor | None = None,
                    second_per_grid_ts=None) -> torch.Tensor:
    """Qwen2.5-VL's position rule: text advances all three axes together; an image or video of
    merged grid (t, h, w) that starts at position p gets (p + time(ti), p + hi, p + wi), and the
    next text token continues at the block's max + 1, over all three axes.

    time(ti) is ti for images and `int(ti * second_per_grid_t * tokens_per_second)` for videos
    (absolute time: `tokens_per_second` positions per second of video). This is the original
    Qwen2.5-VL rule and SGLang's (`mrope_rope_index.get_rope_index`); transformers 5.x continues
    text after a video at p + max(h, w) instead, ignoring a temporal axis that reaches past it
    (`tests/sglang/test_video.py` pins both). Grids are consumed in order across the batch."""
    b, t = input_ids.shape
    out = torch.zeros(3, b, t, dtype=torch.long, device=input_ids.device)
    merge = cfg.spatial_merge_size
    # a modality without grids has no pad tokens to place: its id (if a prompt holds it) is text
    grids = {token: iter(g.tolist()) for token, g in ((cfg.image_token_id, image_grid_thw),
                                                       (cfg.video_token_id, video_grid_thw)) if g is not None}
    # float32, as the processor returns them and SGLang multiplies them: `.long()` truncates, so a
    # product landing on an integer must round the same way
    seconds = iter([torch.tensor(float(s), dtype=torch.float32) for s in second_per_grid_ts]
                   if second_per_grid_ts is not None else [])
    for row in range(b):
        ids = input_ids[row].tolist()
        pos, i, next_pos = [], 0, 0
        while i < t:
            if ids[i] in grids:
                gt, gh, gw = next(grids[ids[i]])
                gh, gw = gh // merge, gw // merge
                ti = torch.arange(gt)
                if ids[i] == cfg.video_token_id:
                    ti = (ti * next(seconds, torch.tensor(1.0)) * cfg.tokens_per_second).long()
                ti = ti.view(-1, 1, 1).expand(gt, gh, gw).flatten()
                hi = torch.arange(gh).view(1, -1, 1).expand(gt, gh, gw).flatten()
                wi = torch.arange(gw).view(1, 1, -1).expand(gt, gh, gw).flatten()
                block = torch.stack([ti, hi, wi]) + next_pos
                pos.append(block)
                next_pos = int(block.max()) + 1
                i += gt * gh * gw
            else:
                pos.append(torch.full((3, 1), next_pos))
                next_pos += 1
                i += 1
        out[:, row] = torch.cat(pos, dim=1)[:, :t].to(out.device)
    return out
