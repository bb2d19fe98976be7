"""Checkpoint configuration: one frozen dataclass read from a model directory.

Fast_dVLM_3B ships a Qwen2.5-VL `config.json` (flat text keys, `vision_config`, `rope_scaling`
with `mrope_section`) plus `bd_size` for the diffusion block size. Newer transformers write the
text keys under `text_config` and RoPE under `rope_parameters`; both spellings are accepted.

Where the checkpoint is silent we use these documented defaults:
- block size: `bd_size` at the top level, else `DEFAULT_BLOCK_SIZE` (32, the paper's value);
- mask token: `mask_token_id` in config.json, else the tokenizer's `|<MASK>|` token; there is no
  default: a checkpoint without a mask token cannot decode by diffusion and is refused;
- EOS ids: `generation_config.json` `eos_token_id`, else config.json, plus `<|im_end|>`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ARCHITECTURE = "Fast_dVLMForConditionalGeneration"
MODEL_TYPE = "fast_dvlm"
# Architectures whose weights we can serve: ours, and a plain Qwen2.5-VL (the AR baseline).
SUPPORTED_ARCHITECTURES = (ARCHITECTURE, "Qwen2_5_VLForConditionalGeneration")
MASK_TOKEN = "|<MASK>|"
DEFAULT_BLOCK_SIZE = 32
DEFAULT_SUB_BLOCK_SIZE = 8


class CheckpointError(ValueError):
    """A model directory that cannot be used, with a message naming what is wrong."""


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, ...]
    max_position_embeddings: int
    tie_word_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise CheckpointError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError("num_attention_heads must be a multiple of num_key_value_heads")
        if 2 * sum(self.mrope_section) != self.head_dim:
            raise CheckpointError(
                f"mrope_section {list(self.mrope_section)} must sum to head_dim/2 = {self.head_dim // 2}"
            )


@dataclass(frozen=True)
class FastDVLMConfig:
    text: TextConfig
    vision: dict[str, Any]  # passed unchanged to transformers' Qwen2_5_VLVisionConfig
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    mask_token_id: int
    eos_token_ids: tuple[int, ...]
    block_size: int = DEFAULT_BLOCK_SIZE
    architecture: str = ARCHITECTURE
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise CheckpointError(f"bd_size must be >= 1, got {self.block_size}")
        if not 0 <= self.mask_token_id < self.text.vocab_size:
            raise CheckpointError(
                f"mask token id {self.mask_token_id} is outside the vocabulary (size {self.text.vocab_size})"
            )

    @property
    def spatial_merge_size(self) -> int:
        return int(self.vision.get("spatial_merge_size", 2))

    @property
    def tokens_per_second(self) -> float:
        return float(self.vision.get("tokens_per_second", 2))

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> FastDVLMConfig:
        model_dir = Path(model_dir)
        path = model_dir / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{model_dir}: no config.json (is this a model directory?)")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: invalid JSON ({e})") from e
        return cls.from_dict(raw, model_dir=model_dir)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], model_dir: Path | None = None) -> FastDVLMConfig:
        archs = raw.get("architectures") or []
        if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise CheckpointError(
                f"unsupported architectures {archs}; expected one of {list(SUPPORTED_ARCHITECTURES)}"
            )
        text_raw = dict(raw)
        text_raw.update(raw.get("text_config") or {})
        rope = text_raw.get("rope_parameters") or text_raw.get("rope_scaling") or {}
        try:
            text = TextConfig(
                vocab_size=int(text_raw["vocab_size"]),
                hidden_size=int(text_raw["hidden_size"]),
                intermediate_size=int(text_raw["intermediate_size"]),
                num_hidden_layers=int(text_raw["num_hidden_layers"]),
                num_attention_heads=int(text_raw["num_attention_heads"]),
                num_key_value_heads=int(text_raw.get("num_key_value_heads", text_raw["num_attention_heads"])),
                rms_norm_eps=float(text_raw.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope.get("rope_theta", text_raw.get("rope_theta", 1e6))),
                mrope_section=tuple(int(x) for x in rope["mrope_section"]),
                max_position_embeddings=int(text_raw.get("max_position_embeddings", 128000)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", text_raw.get("tie_word_embeddings", False))),
            )
        except KeyError as e:
            raise CheckpointError(f"config.json is missing {e.args[0]!r}") from e
        if "vision_config" not in raw:
            raise CheckpointError("config.json has no vision_config")
        mask_id = raw.get("mask_token_id")
        if mask_id is None and model_dir is not None:
            mask_id = _token_id_from_tokenizer(model_dir, MASK_TOKEN)
        if mask_id is None:
            raise CheckpointError(
                f"checkpoint has no mask token: set `mask_token_id` in config.json or add {MASK_TOKEN!r} "
                "to the tokenizer (a plain AR checkpoint cannot be decoded by block diffusion)"
            )
        eos = _eos_ids(raw, model_dir)
        return cls(
            text=text,
            vision=dict(raw["vision_config"]),
            image_token_id=int(raw.get("image_token_id", text_raw.get("image_token_id", -1))),
            video_token_id=int(raw.get("video_token_id", text_raw.get("video_token_id", -1))),
            vision_start_token_id=int(raw.get("vision_start_token_id", -1)),
            mask_token_id=int(mask_id),
            eos_token_ids=eos,
            block_size=int(raw.get("bd_size", DEFAULT_BLOCK_SIZE)),
            architecture=next(a for a in archs if a in SUPPORTED_ARCHITECTURES),
            raw=raw,
        )


def _token_id_from_tokenizer(model_dir: Path, token: str) -> int | None:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return None
    tok = json.loads(path.read_text())
    for added in tok.get("added_tokens", []):
        if added.get("content") == token:
            return int(added["id"])
    vocab = (tok.get("model") or {}).get("vocab") or {}
    return int(vocab[token]) if isinstance(vocab, dict) and token in vocab else None


def _as_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _eos_ids(raw: dict[str, Any], model_dir: Path | None) -> tuple[int, ...]:
    ids: list[int] = []
    gen_path = model_dir / "generation_config.json" if model_dir is not None else None
    if gen_path is not None and gen_path.is_file():
        ids += _as_tuple(json.loads(gen_path.read_text()).get("eos_token_id"))
    if not ids:
        ids += _as_tuple(raw.get("eos_token_id"))
    if model_dir is not None:
        im_end = _token_id_from_tokenizer(model_dir, "<|im_end|>")
        if im_end is not None:
            ids.append(im_end)
    return tuple(dict.fromkeys(ids))


def resolve_model_dir(name: str | Path) -> Path:
    """`demo` -> the bundled demo checkpoint; a directory -> itself; else a Hugging Face id that
    must already be in the local cache (nothing is downloaded)."""
    if str(name) == "demo":
        from .demo import DEMO_CHECKPOINT

        if not (DEMO_CHECKPOINT / "config.json").is_file():
            raise CheckpointError(f"the demo checkpoint is missing at {DEMO_CHECKPOINT}; regenerate it (see README)")
        return DEMO_CHECKPOINT
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file, expected a model directory")
    if str(name).count("/") == 1 and not str(name).startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(str(name), local_files_only=True))
        except Exception as e:
            raise CheckpointError(f"{name}: not a local directory and not in the Hugging Face cache ({e})") from e
    raise CheckpointError(f"{name}: no such model directory")
