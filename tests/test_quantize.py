"""`fast-dvlm quantize` (SmoothQuant + W8A8 FP8 through llmcompressor) on the tiny and demo models:
the written format, what is and is not quantized, smoothing as an identity, bit-exact agreement with
`quantize/fp8.py`, reloading and generating, atomic writes and one-line errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open

from fast_dvlm_sglang.config import FastDVLMConfig
from fast_dvlm_sglang.demo import DEMO_CHECKPOINT
from fast_dvlm_sglang.model import FastDVLMForConditionalGeneration
from fast_dvlm_sglang.quantize import calibration
from fast_dvlm_sglang.quantize.export import calibrate, quantize, quantize_main
from fast_dvlm_sglang.quantize.fp8 import FP8Linear, quantize_per_channel
from fast_dvlm_sglang.tokenizer import load_processor

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def fp8_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "demo-fp8"
    report = quantize("demo", out, calib_samples=12, held_out=4, progress=False)
    return out, report


@pytest.fixture(scope="module")
def fp8_tiny(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "tiny-fp8"
    quantize(str(tiny_dir), out, calib_samples=4, held_out=2, progress=False)
    return out


def _tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("which", ["demo", "tiny"])
def test_written_format(which, fp8_demo, fp8_tiny, tiny_dir):
    out, src_dir = (fp8_demo[0], DEMO_CHECKPOINT) if which == "demo" else (fp8_tiny, tiny_dir)
    cfg, src_cfg = (json.loads((d / "config.json").read_text()) for d in (out, src_dir))
    q = cfg.pop("quantization_config")
    assert cfg == src_cfg  # architecture, bd_size, mask token, ... carried over unchanged
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "float-quantized"
    group = q["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"]
    assert {k: group["weights"][k] for k in ("num_bits", "type", "strategy", "dynamic")} == \
        {"num_bits": 8, "type": "float", "strategy": "channel", "dynamic": False}
    assert {k: group["input_activations"][k] for k in ("num_bits", "type", "strategy", "dynamic")} == \
        {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}
    assert "lm_head" in q["ignore"] and all(n == "lm_head" or n.startswith("model.visual.") for n in q["ignore"])
    for name in ("tokenizer.json", "chat_template.jinja", "preprocessor_config.json", "generation_config.json"):
        if (src_dir / name).exists():
            assert (out / name).read_bytes() == (src_dir / name).read_bytes(), name
    layers = FastDVLMConfig.from_dir(src_dir).text.num_hidden_layers
    assert json.loads((out / "quantization_report.json").read_text())["quantized_layers"] == 7 * layers


def test_only_the_language_tower_linears_are_float8(fp8_demo):
    out, _ = fp8_demo
    got, src = _tensors(out), _tensors(DEMO_CHECKPOINT)
    fp8 = {k for k, v in got.items() if v.dtype == torch.float8_e4m3fn}
    layers = {k.split(".layers.")[1].split(".")[0] for k in fp8}
    assert fp8 == {f"model.language_model.layers.{i}.{n}.weight" for i in layers for n in LINEARS}
    for key in fp8:
        scale = got[key + "_scale"]
        assert scale.dtype == torch.float32 and scale.shape == (got[key].shape[0], 1)
    for key, value in src.items():  # the vision tower and the (tied) embedding: bit-for-bit the source
        if key.startswith("model.visual.") or "embed_tokens" in key:
            assert torch.equal(got[key], value), key


def test_smoothing_is_an_identity_and_touches_exactly_the_mapped_tensors():
    source = FastDVLMForConditionalGeneration.from_pretrained(DEMO_CHECKPOINT)
    smoothed = FastDVLMForConditionalGeneration.from_pretrained(DEMO_CHECKPOINT)
    proc = load_processor(DEMO_CHECKPOINT)
    calib = calibration.samples(proc, source.config, "demo", 6)
    calibrate(smoothed, DEMO_CHECKPOINT, proc, calib, 0.5, quantize=False)
    before, after = source.state_dict(), smoothed.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    expected = {f"model.language_model.layers.{i}.{n}"
                for i in range(len(source.model.language_model.layers))
                for n in ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
                          "self_attn.k_proj.weight", "self_attn.v_proj.weight", "mlp.gate_proj.weight",
                          "mlp.up_proj.weight", "mlp.down_proj.weight")}
    assert changed == expected
    held = calibration.samples(proc, source.config, "demo", 4, modes=calibration.MODES, seed=calibration.HELD_OUT_SEED)
    from fast_dvlm_sglang.quantize.report import logits

    for a, b in zip(logits(source, held), logits(smoothed, held)):
        # float32: the smoothing scales are applied to weights and divided out of norms
        assert torch.allclose(a, b, atol=1e-4, rtol=0), (a - b).abs().max()


def test_weights_are_exactly_our_per_channel_quantization(fp8_demo, tiny_dir):
    """What compressed-tensors wrote equals `fp8.quantize_per_channel` of the smoothed weight, bit
    for bit (so the Triton kernel, SGLang and the reference all start from the same numbers)."""
    source = FastDVLMForConditionalGeneration.from_pretrained(DEMO_CHECKPOINT)
    proc = load_processor(DEMO_CHECKPOINT)
    calib = calibration.samples(proc, source.config, "demo", 12)
    calibrate(source, DEMO_CHECKPOINT, proc, calib, 0.5, quantize=False)
    got = _tensors(fp8_demo[0])
    for name, module in source.named_modules():
        if isinstance(module, torch.nn.Linear) and ".language_model.layers." in name:
            q, s = quantize_per_channel(module.weight.detach())
            assert torch.equal(got[name + ".weight"].view(torch.uint8), q.view(torch.uint8)), name
            assert torch.equal(got[name + ".weight_scale"], s), name


def test_reload_runs_fp8_linears_and_generates(fp8_demo):
    from fast_dvlm_sglang.decoding import GenerationConfig, Prompt, generate
    from fast_dvlm_sglang.demo import shapes
    from fast_dvlm_sglang.processing import encode_chat

    out, _ = fp8_demo
    model = FastDVLMForConditionalGeneration.from_pretrained(out)
    kinds = {type(m).__name__ for n, m in model.named_modules() if n.startswith("model.language_model.layers.0.")}
    assert "FP8Linear" in kinds and "Linear" not in kinds
    assert not any(isinstance(m, FP8Linear) for n, m in model.named_modules() if n.startswith("model.visual"))
    proc = load_processor(out)
    tie_free = 0
    for sample in shapes.make_split(555, 6):
        enc = encode_chat(proc, sample.prompt_messages)
        prompt = Prompt(enc.input_ids, enc.pixel_values, enc.image_grid_thw)
        ar = generate(model, prompt, GenerationConfig(algorithm="ar", max_new_tokens=48))
        spec = generate(model, prompt, GenerationConfig(algorithm="spec", max_new_tokens=48))
        tie_free += spec.token_ids == ar.token_ids
    assert tie_free >= 5  # greedy spec == greedy AR on the FP8 model (one near tie allowed in six)


def test_report(fp8_demo):
    _, rep = fp8_demo
    assert set(rep["held_out"]) == {"causal", "draft"}
    for mode in ("causal", "draft"):
        assert rep["held_out"][mode]["top1_agreement"] > 0.9 and rep["held_out"][mode]["mean_kl"] < 0.05
    assert rep["weight_error_summary"]["max_abs_over_max"] <= 2 ** -4 + 1e-6  # half an e4m3 ulp of the row max
    layer = rep["layers"]["model.language_model.layers.0.mlp.down_proj"]
    assert layer["activation_scale_range"][0] <= layer["activation_scale_range"][1]
    assert rep["seconds"] > 0 and rep["peak_rss_mb"] > 0


def _cli(*argv) -> tuple[int, str]:
    p = subprocess.run([sys.executable, "-m", "fast_dvlm_sglang.cli", "quantize", *argv], capture_output=True, text=True,
                       timeout=600)
    return p.returncode, p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""


@pytest.mark.parametrize("argv,message", [
    (["--model", "/no/such/model"], "/no/such/model"),
    (["--scheme", "w4a16"], "unknown scheme 'w4a16'"),
    (["--smoothquant-alpha", "1.5"], "--smoothquant-alpha must be in [0, 1]"),
    (["--smoothquant-alpha", "-0.1"], "--smoothquant-alpha must be in [0, 1]"),
    (["--calib-samples", "0"], "--calib-samples must be >= 1"),
    (["--calib-modes", "causal,sideways"], "--calib-modes"),
    (["--calib-data", "{empty}"], "has no records"),
    (["--calib-data", "{bad_json}"], "not a JSON object"),
    (["--calib-data", "{missing_image}"], "not found"),
    (["--calib-data", "/no/such/calib.jsonl"], "no such file"),
], ids=["missing_model", "scheme", "alpha_high", "alpha_low", "samples", "modes", "empty_calib", "bad_json",
        "missing_image", "missing_calib"])
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, argv, message):
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "hi"}\nnot json\n')
    (tmp_path / "img.jsonl").write_text('{"prompt": "hi", "image": "nope.png"}\n')
    files = {"{empty}": tmp_path / "empty.jsonl", "{bad_json}": tmp_path / "bad.jsonl",
             "{missing_image}": tmp_path / "img.jsonl"}
    argv = [str(files.get(a, a)) for a in argv]
    code = quantize_main(["--out", str(tmp_path / "out"), *argv])  # in process: the CLI's own entry
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_existing_out_needs_force(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    code, line = _cli("--out", str(tmp_path / "out"))
    assert code == 2 and "--force" in line
    assert (tmp_path / "out" / "keep").exists()


def test_calibration_file_records(tmp_path, fp8_tiny):
    from PIL import Image

    Image.new("RGB", (56, 56), "red").save(tmp_path / "red.png")
    (tmp_path / "calibration.jsonl").write_text(
        json.dumps({"prompt": "What color is it?", "image": "red.png", "answer": "red"}) + "\n"
        + json.dumps({"prompt": "Say hi."}) + "\n")
    assert quantize_main(["--model", "demo", "--out", str(tmp_path / "out"), "--calib-data", str(tmp_path),
                          "--calib-samples", "2", "--json"]) == 0
    assert (tmp_path / "out" / "config.json").is_file()


def test_a_failure_mid_write_leaves_no_checkpoint(tmp_path, monkeypatch):
    from fast_dvlm_sglang import checkpoint

    def broken(tensors, path, metadata=None):
        open(path, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        quantize("demo", tmp_path / "out", calib_samples=2, held_out=1, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither DST nor its temp dir


def test_a_killed_run_leaves_no_checkpoint(tmp_path):
    """SIGKILL the moment the checkpoint's temp dir appears (the write has begun; a fixed sleep
    raced the whole run on a fast machine): no `out`, only the hidden temp dir."""
    proc = subprocess.Popen([sys.executable, "-m", "fast_dvlm_sglang.cli", "quantize", "--out", str(tmp_path / "out"),
                             "--calib-samples", "8"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(tmp_path.glob(".out.tmp-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.0005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before its checkpoint write began"
    assert list(tmp_path.glob(".out.tmp-*"))
    assert not (tmp_path / "out").exists()
