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


_LOAD_CONFIG_ALONE = """
import json, sys
from transformers import AutoConfig
c = AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True)
print(json.dumps({"model_type": c.model_type, "module": type(c).__module__, "hidden": c.text_config.hidden_size,
                  "layers": c.text_config.num_hidden_layers, "depth": c.vision_config.depth,
                  "ours": sorted(m for m in sys.modules if m.startswith("fast_dvlm_sglang"))}))
"""


def test_saved_config_loads_without_this_package(tmp_path):
    """A process without fast_dvlm_sglang (SGLang's benchmark client, lm-eval) reads a checkpoint
    we wrote with `trust_remote_code=True`: config.json's auto_map names the config class written
    beside it, Qwen2.5-VL's under `fast_dvlm`; the values are the checkpoint's."""
    import subprocess
    import sys

    config = tiny_config_dict()
    out = save_checkpoint(tiny_state_dict(config), config, tmp_path / "m")
    done = subprocess.run([sys.executable, "-c", _LOAD_CONFIG_ALONE, str(out)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got == {"model_type": "fast_dvlm", "module": got["module"], "hidden": config["hidden_size"],
                   "layers": config["num_hidden_layers"], "depth": config["vision_config"]["depth"], "ours": []}
    assert got["module"].startswith("transformers_modules.")  # the checkpoint's file, not a registered class


def test_auto_config_is_added_only_where_it_is_ours(tmp_path):
    """A checkpoint naming its own config code (one from the Hub, carried over by the FP8 export)
    keeps it; our class file is not written over it. A non-fast_dvlm config gets no auto_map."""
    from fast_dvlm_sglang.checkpoint import REMOTE_CONFIG_FILE, with_auto_config

    config = tiny_config_dict()
    theirs = {**config, "auto_map": {"AutoConfig": "configuration_x.XConfig", "AutoModel": "modeling_x.X"}}
    out = save_checkpoint(tiny_state_dict(config), theirs, tmp_path / "theirs",
                          extra_files={"configuration_x.py": "# theirs\n"})
    assert json.loads((out / "config.json").read_text())["auto_map"] == theirs["auto_map"]
    assert not (out / REMOTE_CONFIG_FILE).exists()
    other = {**config, "model_type": "qwen2_5_vl"}
    assert with_auto_config(other) == (other, False)
    added, write = with_auto_config({**config, "auto_map": {"AutoModel": "modeling_x.X"}})
    assert write and added["auto_map"] == {"AutoModel": "modeling_x.X",
                                           "AutoConfig": "configuration_fast_dvlm.FastDVLMConfig"}


def test_bundled_demo_names_the_current_config_class():
    """The committed demo checkpoint carries what `save_checkpoint` writes today."""
    from fast_dvlm_sglang import checkpoint
    from fast_dvlm_sglang.demo import DEMO_CHECKPOINT

    demo_config = json.loads((DEMO_CHECKPOINT / "config.json").read_text())
    assert demo_config["auto_map"] == {"AutoConfig": checkpoint.REMOTE_CONFIG_CLASS}
    package_file = checkpoint.Path(checkpoint.__file__).with_name(checkpoint.REMOTE_CONFIG_FILE)
    assert (DEMO_CHECKPOINT / checkpoint.REMOTE_CONFIG_FILE).read_bytes() == package_file.read_bytes()
