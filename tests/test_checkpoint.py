"""Both key layouts, tied/untied, sharded checkpoints; clear errors for broken ones; atomic writes."""

import json

import pytest
import torch
from helpers import tiny_config_dict, tiny_state_dict, write_tiny
from safetensors.torch import load_file, save_file

from fast_dvlm_sglang.checkpoint import read_raw_tensors, save_checkpoint
from fast_dvlm_sglang.config import CheckpointError, FastDVLMConfig
from fast_dvlm_sglang.model import FastDVLMForConditionalGeneration


def _tensors(model):
    return {k: v for k, v in model.state_dict().items()}


@pytest.mark.parametrize("tie", [True, False])
def test_new_old_and_sharded_layouts_load_identical_tensors(tmp_path, tie):
    config = tiny_config_dict(tie_word_embeddings=tie)
    state = tiny_state_dict(config, seed=4)
    dirs = {
        "new": save_checkpoint(state, config, tmp_path / "new", layout="new"),
        "old": save_checkpoint(state, config, tmp_path / "old", layout="old"),
        "sharded": save_checkpoint(state, config, tmp_path / "sharded", layout="old", max_shard_bytes=20_000),
    }
    old_keys = load_file(str(dirs["old"] / "model.safetensors")).keys()
    assert any(k.startswith("visual.") for k in old_keys) and not any(k.startswith("model.language_model") for k in old_keys)
    assert (dirs["sharded"] / "model.safetensors.index.json").is_file()
    assert len(list(dirs["sharded"].glob("model-*.safetensors"))) > 1
    loaded = {name: _tensors(FastDVLMForConditionalGeneration.from_pretrained(d)) for name, d in dirs.items()}
    for key, value in state.items():
        for name in dirs:
            assert torch.equal(loaded[name][key], value), (name, key)
    model = FastDVLMForConditionalGeneration.from_pretrained(dirs["new"])
    tied = model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    assert tied == tie


def test_missing_tensor_is_named(tmp_path):
    d = write_tiny(tmp_path / "m")
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["model.language_model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing.*layers.1.mlp.up_proj"):
        FastDVLMForConditionalGeneration.from_pretrained(d)


def test_shape_mismatch_with_config_is_reported(tmp_path):
    d = write_tiny(tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        FastDVLMForConditionalGeneration.from_pretrained(d)


def test_foreign_tensor_is_reported(tmp_path):
    d = write_tiny(tmp_path / "m")
    tensors = load_file(str(d / "model.safetensors"))
    tensors["encoder.weight"] = torch.zeros(2)
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="encoder.weight"):
        read_raw_tensors(d) and FastDVLMForConditionalGeneration.from_pretrained(d)


def test_corrupt_weights_file(tmp_path):
    d = write_tiny(tmp_path / "m")
    (d / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        FastDVLMForConditionalGeneration.from_pretrained(d)


def test_checkpoint_without_mask_token_is_refused(tmp_path):
    config = tiny_config_dict()
    del config["mask_token_id"]
    save_checkpoint(tiny_state_dict(tiny_config_dict()), config, tmp_path / "m")
    with pytest.raises(CheckpointError, match="no mask token"):
        FastDVLMConfig.from_dir(tmp_path / "m")


def test_wrong_architecture_and_missing_config(tmp_path):
    config = tiny_config_dict()
    config["architectures"] = ["LlamaForCausalLM"]
    save_checkpoint(tiny_state_dict(tiny_config_dict()), config, tmp_path / "m")
    with pytest.raises(CheckpointError, match="unsupported architectures"):
        FastDVLMConfig.from_dir(tmp_path / "m")
    with pytest.raises(CheckpointError, match="no config.json"):
        FastDVLMConfig.from_dir(tmp_path)


def test_block_size_from_config_and_default(tmp_path):
    config = tiny_config_dict(block_size=16)
    assert FastDVLMConfig.from_dict(config).block_size == 16
    del config["bd_size"]
    assert FastDVLMConfig.from_dict(config).block_size == 32


def test_atomic_write_keeps_old_checkpoint_when_writing_fails(tmp_path):
    config = tiny_config_dict()
    state = tiny_state_dict(config)
    d = save_checkpoint(state, config, tmp_path / "m")
    before = (d / "model.safetensors").read_bytes()
    bad = dict(state)
    bad["model.language_model.norm.weight"] = "not a tensor"
    with pytest.raises(AttributeError):
        save_checkpoint(bad, config, d)
    assert (d / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp dirs left behind
