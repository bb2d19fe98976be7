"""`fast-dvlm` CLI: make-tiny, generate (chat template, --raw, --json), one-line errors."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from fast_dvlm_sglang.cli import main
from fast_dvlm_sglang.config import FastDVLMConfig
from fast_dvlm_sglang.decoding import GenerationConfig, Prompt, generate
from fast_dvlm_sglang.model import FastDVLMForConditionalGeneration
from fast_dvlm_sglang.processing import encode_chat
from fast_dvlm_sglang.tokenizer import load_processor


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "fast_dvlm_sglang.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_make_tiny_writes_released_format(tmp_path):
    out = tmp_path / "t"
    assert main(["make-tiny", "--out", str(out), "--seed", "3"]) == 0
    raw = json.loads((out / "config.json").read_text())
    assert raw["architectures"] == ["Fast_dVLMForConditionalGeneration"] and raw["bd_size"] == 32
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "generation_config.json"):
        assert (out / name).is_file()
    cfg = FastDVLMConfig.from_dir(out)
    tok = load_processor(out).tokenizer
    assert cfg.mask_token_id == tok.convert_tokens_to_ids("|<MASK>|")
    assert tok.convert_tokens_to_ids("<|im_end|>") in cfg.eos_token_ids


@pytest.mark.parametrize("algorithm", ["ar", "mdm", "spec"])
def test_generate_json_matches_library_call(tiny_dir, tmp_path, algorithm):
    image = tmp_path / "img.png"
    Image.new("RGB", (112, 112), (200, 30, 30)).save(image)
    res = run_cli("generate", "--model", tiny_dir, "--prompt", "What colour?", "--image", image,
                  "--algorithm", algorithm, "--max-new-tokens", "12", "--json")
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert set(got) == {"algorithm", "text", "token_ids", "nfe", "tokens_per_nfe"}
    processor = load_processor(tiny_dir)
    enc = encode_chat(processor, [{"role": "user", "content": [{"type": "image", "image": str(image)},
                                                                {"type": "text", "text": "What colour?"}]}])
    model = FastDVLMForConditionalGeneration.from_pretrained(tiny_dir)
    want = generate(model, Prompt(enc.input_ids, enc.pixel_values, enc.image_grid_thw),
                    GenerationConfig(algorithm, max_new_tokens=12), tokenizer=processor.tokenizer)
    assert got["token_ids"] == want.token_ids and got["text"] == want.text and got["nfe"] == want.nfe


def test_generate_raw_skips_chat_template(tiny_dir, capsys):
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "hello", "--raw", "--json",
                 "--algorithm", "ar", "--max-new-tokens", "4"]) == 0
    raw = json.loads(capsys.readouterr().out)
    model = FastDVLMForConditionalGeneration.from_pretrained(tiny_dir)
    tok = load_processor(tiny_dir).tokenizer
    want = generate(model, Prompt(tok.encode("hello", add_special_tokens=False)), GenerationConfig("ar", max_new_tokens=4))
    assert raw["token_ids"] == want.token_ids


@pytest.mark.parametrize("args, message", [
    (["--model", "/does/not/exist"], "no such model directory"),
    (["--image", "/etc/hostname"], "cannot read the prompt/image"),
    (["--image", "/no/such.png"], "no such file"),
    (["--temperature", "-1"], "temperature"),
    (["--max-new-tokens", "0"], "max_new_tokens"),
])
def test_bad_input_gives_one_line_error(tiny_dir, args, message):
    base = ["generate", "--model", str(tiny_dir), "--prompt", "x"]
    res = run_cli(*base, *args)
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr
