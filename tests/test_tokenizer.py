"""Tokenizer, chat template and chat encoding of the demo model (no weights needed)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from fast_dvlm_sglang import tokenizer as tk
from fast_dvlm_sglang.demo import shapes
from fast_dvlm_sglang.processing import encode_chat, encode_training_conversation

VOCAB_SIZE = 512

# The released tokenizer's ids, to check the relative order.
RELEASED_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
                "<|vision_pad|>": 151654, "<|image_pad|>": 151655, "<|video_pad|>": 151656, "|<MASK>|": 151665}  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = tk.train_tokenizer(shapes.corpus_for_tokenizer(0, 2000), VOCAB_SIZE)
    out = tmp_path_factory.mktemp("tok")
    tk.write_tokenizer_files(tok, out, image_size=112)
    return out


@pytest.fixture(scope="module")
def processor(model_dir):
    return tk.load_processor(model_dir)


@pytest.fixture(scope="module")
def tokenizer(processor):
    return processor.tokenizer


def test_training_is_deterministic():
    a = tk.train_tokenizer(shapes.corpus_for_tokenizer(0, 300), VOCAB_SIZE)
    b = tk.train_tokenizer(shapes.corpus_for_tokenizer(0, 300), VOCAB_SIZE)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()


def test_written_files(model_dir):
    names = {p.name for p in model_dir.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
            "preprocessor_config.json"} <= names  # fmt: skip
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|im_end|>" and cfg["pad_token"] == "<|endoftext|>"
    assert cfg["chat_template"] == tk.CHAT_TEMPLATE
    assert (model_dir / "chat_template.jinja").read_text() == tk.CHAT_TEMPLATE
    pp = json.loads((model_dir / "preprocessor_config.json").read_text())
    assert pp["image_processor_type"] == "Qwen2VLImageProcessor"
    assert pp["processor_class"] == "Qwen2_5_VLProcessor"
    assert (pp["patch_size"], pp["temporal_patch_size"], pp["merge_size"]) == (14, 2, 2)
    assert pp["image_mean"] == [0.48145466, 0.4578275, 0.40821073]
    assert pp["image_std"] == [0.26862954, 0.26130258, 0.27577711]
    assert pp["min_pixels"] <= 112 * 112 == pp["max_pixels"]


def test_special_tokens_order_and_single(tokenizer):
    ids = tokenizer.convert_tokens_to_ids(list(tk.SPECIAL_TOKENS))
    assert len(tk.SPECIAL_TOKENS) == 23 and tk.SPECIAL_TOKENS[-1] == tk.MASK_TOKEN == "|<MASK>|"
    # contiguous, in order, right after the BPE vocabulary, exactly as 151643..151665 in the release
    assert ids == list(range(ids[0], ids[0] + 23))
    assert len(tokenizer) == VOCAB_SIZE and ids[-1] == VOCAB_SIZE - 1
    for tok, released in RELEASED_IDS.items():
        assert tokenizer.convert_tokens_to_ids(tok) - ids[0] == released - 151643
    for tok in tk.SPECIAL_TOKENS:
        assert (
            tokenizer.encode(f"x{tok}y", add_special_tokens=False).count(tokenizer.convert_tokens_to_ids(tok))
            == 1
        )
        assert tokenizer.encode(tok, add_special_tokens=False) == [tokenizer.convert_tokens_to_ids(tok)]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    # the assistant prefix is three tokens, as [151644, 77091, 198] in the release
    prefix = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(prefix) == ["<|im_start|>", "assistant", "Ċ"]


def test_autotokenizer_matches_trained(model_dir):
    from transformers import AutoTokenizer

    trained = tk.train_tokenizer(shapes.corpus_for_tokenizer(0, 2000), VOCAB_SIZE)
    loaded = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    text = "There are 17 shapes\n\n  on a wörld!|<MASK>|<|im_start|>assistant\n<tool_call>"
    assert loaded.encode(text, add_special_tokens=False) == trained.encode(text, add_special_tokens=False)
    assert len(loaded) == len(trained)


def test_chat_template_text(tokenizer):
    messages = [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "2 + 3 = 5."},
        {"role": "user", "content": "Spell the word box."},
    ]
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n2 + 3 = 5.<|im_end|>\n"
        "<|im_start|>user\nSpell the word box.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected
    assert (
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        == expected[: -len("<|im_start|>assistant\n")]
    )


def test_chat_template_image_and_system(tokenizer):
    img = Image.new("RGB", (112, 112), "white")
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "Describe the image."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Nothing."}]},
        {"role": "user", "content": [{"type": "text", "text": "And this?"}, {"type": "image_url", "image_url": {"url": "x"}}]},
    ]  # fmt: skip
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe the image.<|im_end|>\n"
        "<|im_start|>assistant\nNothing.<|im_end|>\n"
        "<|im_start|>user\nAnd this?<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected


def test_roundtrip_dataset_answers(tokenizer):
    for sample in shapes.make_split(3, 200):
        for msg in sample.messages:
            text = msg["content"] if isinstance(msg["content"], str) else msg["content"][-1]["text"]
            ids = tokenizer.encode(text, add_special_tokens=False)
            assert tokenizer.decode(ids) == text
    weird = "Ünïcödé ✓ 日本 \t\n  ok"
    assert tokenizer.decode(tokenizer.encode(weird, add_special_tokens=False)) == weird


def test_encode_chat_image(processor, tokenizer):
    sample = next(s for s in shapes.make_split(0, 50) if s.kind == "describe")
    enc = encode_chat(processor, sample.prompt_messages)
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    side = shapes.IMAGE_SIZE // 14  # patches per side (the image fits the pixel budget as it is)
    assert enc.input_ids.count(pad) == (side // 2) ** 2
    assert enc.pixel_values.shape == (side * side, 3 * 2 * 14 * 14)
    assert enc.image_grid_thw.tolist() == [[1, side, side]]
    text = tokenizer.decode(enc.input_ids)
    assert text.startswith(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
    )
    assert text.endswith(
        "<|vision_end|>"
        + sample.prompt_messages[0]["content"][1]["text"]
        + "<|im_end|>\n<|im_start|>assistant\n"
    )
    # identical to the HF processor's own expansion
    hf_text = processor.apply_chat_template(
        sample.prompt_messages, tokenize=False, add_generation_prompt=True
    )
    hf = processor(text=[hf_text], images=[sample.image], return_tensors="pt")
    assert hf["input_ids"][0].tolist() == enc.input_ids
    assert torch.equal(hf["pixel_values"], enc.pixel_values)


def test_encode_chat_text_only(processor, tokenizer):
    enc = encode_chat(processor, [{"role": "user", "content": "What is 1 + 1?"}])
    assert enc.pixel_values is None and enc.image_grid_thw is None
    assert tokenizer.decode(enc.input_ids).endswith(
        "<|im_start|>user\nWhat is 1 + 1?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_training_labels_mask(processor, tokenizer):
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    samples = shapes.make_split(0, 60)
    multi = next(s for s in samples if s.kind == "multiturn")
    for sample in [multi, *samples[:20]]:
        enc = encode_training_conversation(processor, sample.messages)
        assert len(enc.input_ids) == len(enc.labels_mask) == len(enc.turn_ids)
        answers = [m["content"] for m in sample.messages if m["role"] == "assistant"]
        for turn, answer in enumerate(answers):
            ids = [t for t, k in zip(enc.input_ids, enc.turn_ids) if k == turn]
            assert ids == tokenizer.encode(answer, add_special_tokens=False) + [im_end]
            pos = [j for j, k in enumerate(enc.turn_ids) if k == turn]
            assert pos == list(range(pos[0], pos[-1] + 1))  # contiguous
            # preceded by the (unlabelled) assistant prefix
            assert tokenizer.decode(enc.input_ids[pos[0] - 3 : pos[0]]) == "<|im_start|>assistant\n"
        supervised = [t for t, m in zip(enc.input_ids, enc.labels_mask) if m]
        expected = [t for a in answers for t in tokenizer.encode(a, add_special_tokens=False) + [im_end]]
        assert supervised == expected
        assert all((k >= 0) == m for k, m in zip(enc.turn_ids, enc.labels_mask))
        plain = encode_chat(processor, sample.messages, add_generation_prompt=False)
        assert plain.input_ids == enc.input_ids
    enc = encode_training_conversation(processor, multi.messages)
    assert max(enc.turn_ids) == 1


def test_rewrite_from_loaded_tokenizer_is_identical(model_dir, tokenizer, tmp_path):
    tk.write_tokenizer_files(tokenizer, tmp_path)
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "preprocessor_config.json",
    ):
        assert (tmp_path / name).read_bytes() == (model_dir / name).read_bytes(), name
    assert tokenizer.mask_token == tk.MASK_TOKEN and tokenizer.mask_token_id == len(tokenizer) - 1
