"""Reading and writing safetensors checkpoints in both Qwen2.5-VL key layouts.

transformers >= 4.52 writes `model.language_model.*`, `model.visual.*`, `lm_head.*`; older
releases wrote `model.*` (text), `visual.*`, `lm_head.*`. We normalise to the new layout, which
is also the reference model's own parameter naming. Writes are atomic: a checkpoint directory
either appears complete or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import MODEL_TYPE, CheckpointError, FastDVLMConfig

# transformers' own config for processes without this package (`configuration_fast_dvlm.py`)
REMOTE_CONFIG_FILE = "configuration_fast_dvlm.py"
REMOTE_CONFIG_CLASS = "configuration_fast_dvlm.FastDVLMConfig"

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def to_new_layout(key: str) -> str:
    if key.startswith(("model.language_model.", "model.visual.", "lm_head.")):
        return key
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model."):
        return "model.language_model." + key[len("model.") :]
    raise CheckpointError(f"unexpected checkpoint tensor {key!r} (not a Qwen2.5-VL key)")


def to_old_layout(key: str) -> str:
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model.") :]
    if key.startswith("model.visual."):
        return key[len("model.") :]
    return key


def weight_files(model_dir: str | Path) -> list[Path]:
    model_dir = Path(model_dir)
    index = model_dir / INDEX_NAME
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (model_dir / s).is_file()]
        if missing:
            raise CheckpointError(f"{model_dir}: shards listed in {INDEX_NAME} are missing: {missing}")
        return [model_dir / s for s in shards]
    single = model_dir / WEIGHTS_NAME
    if single.is_file():
        return [single]
    found = sorted(model_dir.glob("*.safetensors"))
    if found:
        return found
    raise CheckpointError(f"{model_dir}: no {WEIGHTS_NAME}, {INDEX_NAME} or *.safetensors files")


def read_raw_tensors(model_dir: str | Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in weight_files(model_dir):
        try:
            part = load_file(str(path))
        except Exception as e:  # safetensors raises several types for corrupt files
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
        dup = tensors.keys() & part.keys()
        if dup:
            raise CheckpointError(f"{path}: tensors appear in more than one shard: {sorted(dup)[:5]}")
        tensors.update(part)
    return tensors


def load_state_dict(model_dir: str | Path, cfg: FastDVLMConfig, model=None) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under the reference model's names, checked against `cfg` (and
    against `model`'s parameters when given: an FP8 model has `weight_scale`s)."""
    from .model import FastDVLMForConditionalGeneration

    state: dict[str, torch.Tensor] = {}
    for key, value in read_raw_tensors(model_dir).items():
        new = to_new_layout(key)
        if new in state:
            raise CheckpointError(f"{model_dir}: {key!r} is present in both key layouts")
        state[new] = value
    embed = "model.language_model.embed_tokens.weight"
    if cfg.text.tie_word_embeddings:
        state.setdefault("lm_head.weight", state.get(embed))
    if model is None:
        with torch.device("meta"):
            model = FastDVLMForConditionalGeneration(cfg)
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(
            f"{model_dir}: checkpoint does not match config.json: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for key, ref in expected.items():
        if tuple(state[key].shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{model_dir}: {key} has shape {tuple(state[key].shape)}, config.json implies {tuple(ref.shape)}"
            )
    return state


def atomic_write_dir(out_dir: str | Path, write) -> Path:
    """Run `write(tmp_dir)` and move the result to `out_dir` in one rename.

    An existing `out_dir` is replaced only after the new contents are complete, so a crash
    leaves either the old or the new checkpoint, never a half-written one.
    """
    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        write(tmp)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "x")
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


def with_auto_config(config: dict) -> tuple[dict, bool]:
    """`config` with `auto_map.AutoConfig` naming our `configuration_fast_dvlm.py` (and True: the
    file must be written), unless it is not a fast_dvlm config or already names its own (a
    checkpoint from the Hub with its remote code, whose files the FP8 export carries over)."""
    auto_map = config.get("auto_map") or {}
    if config.get("model_type") != MODEL_TYPE or "AutoConfig" in auto_map:
        return config, False
    return {**config, "auto_map": {**auto_map, "AutoConfig": REMOTE_CONFIG_CLASS}}, True


def save_checkpoint(
    state_dict: Mapping[str, torch.Tensor],
    config: dict,
    out_dir: str | Path,
    *,
    layout: str = "new",
    max_shard_bytes: int | None = None,
    extra_files: Mapping[str, str | bytes] | None = None,
) -> Path:
    """Write config.json, safetensors weights (optionally sharded with an index) and extra files;
    a fast_dvlm config also gets transformers' config class for processes without this package
    (`with_auto_config`)."""
    if layout not in ("new", "old"):
        raise ValueError(f"layout must be 'new' or 'old', got {layout!r}")
    tensors = {}
    for key, value in state_dict.items():
        if key == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        tensors[key if layout == "new" else to_old_layout(key)] = value.detach().contiguous().cpu()

    config, remote_config = with_auto_config(config)

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if remote_config:  # before the extra files: a checkpoint's own file of that name wins
            shutil.copyfile(Path(__file__).with_name(REMOTE_CONFIG_FILE), tmp / REMOTE_CONFIG_FILE)
        if max_shard_bytes is None:
            save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        else:
            _save_sharded(tensors, tmp, max_shard_bytes)
        for name, content in (extra_files or {}).items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(tmp / name, mode) as f:
                f.write(content)

    return atomic_write_dir(out_dir, write)


def _save_sharded(tensors: dict[str, torch.Tensor], out: Path, max_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
