"""A tiny byte-level BPE tokenizer with Qwen2.5-VL's special tokens and chat template.

The bundled demo model is a miniature Qwen2.5-VL, so its tokenizer mirrors the released
Fast_dVLM_3B tokenizer in everything except the size of the learned vocabulary:

* the same pipeline as ``Qwen2Tokenizer`` (NFC, Qwen2's split regex, byte-level BPE, byte-level
  decoder), so ``AutoTokenizer`` rebuilds exactly the tokenizer written here;
* the same 22 added tokens as Qwen2.5-VL plus Fast-dVLM's ``|<MASK>|``, in the released order
  (ids 151643..151665 there; here they directly follow the byte-level BPE vocabulary);
* the same chat template (default system prompt, ``<|vision_start|><|image_pad|><|vision_end|>``
  per image, ``<|im_start|>assistant\\n`` as generation prompt).

The learned part is trained deterministically with the ``tokenizers`` library and then put in a
canonical order: the 256 byte symbols first, in GPT-2's ``bytes_to_unicode`` order like Qwen,
followed by one token per merge in merge order.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLProcessor
from transformers.processing_utils import ProcessorMixin

from .video import video_frame_bounds

__all__ = [
    "CHAT_TEMPLATE",
    "DEFAULT_SYSTEM_PROMPT",
    "IMAGE_MEAN",
    "IMAGE_STD",
    "MASK_TOKEN",
    "Qwen2_5_VLImageTextProcessor",
    "SPECIAL_TOKENS",
    "load_processor",
    "load_tokenizer",
    "train_tokenizer",
    "write_tokenizer_files",
]

MASK_TOKEN = "|<MASK>|"

# In the released order (Qwen2.5-VL ids 151643..151664, then Fast-dVLM's mask token 151665).
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    MASK_TOKEN,
)

# Qwen2.5's tokenizer.json marks these added tokens `"special": false` (they survive
# `skip_special_tokens=True` when decoding); everything else is special.
_NOT_SPECIAL = frozenset(
    {
        "<tool_call>",
        "</tool_call>",
        "<|fim_prefix|>",
        "<|fim_middle|>",
        "<|fim_suffix|>",
        "<|fim_pad|>",
        "<|repo_name|>",
        "<|file_sep|>",
    }
)

# Qwen2.5-VL's `additional_special_tokens` in tokenizer_config.json.
_ADDITIONAL_SPECIAL_TOKENS = SPECIAL_TOKENS[1:14]

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2.5-VL-Instruct's chat template, verbatim.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2's pre-tokenization regex (digits are split one by one).
PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# Qwen2-VL image processor settings (OpenAI CLIP statistics); only the pixel budget is scaled down.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
PATCH_SIZE = 14
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2
QWEN_MIN_PIXELS = 56 * 56  # Qwen2.5-VL's real lower bound

DEFAULT_MODEL_MAX_LENGTH = 4096


def _bytes_to_unicode() -> list[str]:
    """GPT-2's reversible byte -> printable character table, in byte-id order of Qwen's vocab."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def _configure_pipeline(tok: Tokenizer) -> None:
    """Qwen2's normalizer / pre-tokenizer / decoder / post-processor (as in its tokenizer.json)."""
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)


def _new_bpe(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    _configure_pipeline(tok)
    return tok


def train_tokenizer(corpus: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE on ``corpus`` and wrap it with the special tokens and chat template.

    ``vocab_size`` is the total size including the 23 added tokens; it is an upper bound (the
    trainer stops early when no pair occurs at least twice). Deterministic for a given corpus.
    """
    n_bpe = vocab_size - len(SPECIAL_TOKENS)
    if n_bpe < 256:
        raise ValueError(f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
    texts = list(corpus)
    if not texts:
        raise ValueError("empty corpus")

    draft = _new_bpe({}, [])
    trainer = trainers.BpeTrainer(
        vocab_size=n_bpe,
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    draft.train_from_iterator(texts, trainer=trainer)
    merges = [
        tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
        for m in json.loads(draft.to_str())["model"]["merges"]
    ]

    # Canonical ids: bytes in bytes_to_unicode order, then each merge's product in merge order.
    vocab = {ch: i for i, ch in enumerate(_bytes_to_unicode())}
    for left, right in merges:
        merged = left + right
        if merged not in vocab:
            vocab[merged] = len(vocab)
    tok = _new_bpe(vocab, merges)
    for token in SPECIAL_TOKENS:  # one at a time: ids follow SPECIAL_TOKENS order exactly
        tok.add_tokens([AddedToken(token, special=token not in _NOT_SPECIAL, normalized=False)])
    return _wrap(tok)


def _wrap(tok: Tokenizer, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> PreTrainedTokenizerFast:
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        chat_template=CHAT_TEMPLATE,
    )
    _check_special_ids(wrapped)
    return wrapped


def _check_special_ids(tokenizer) -> None:
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    base = ids[0]
    if ids != list(range(base, base + len(SPECIAL_TOKENS))) or base != len(tokenizer) - len(SPECIAL_TOKENS):
        raise ValueError(f"special tokens are not contiguous at the end of the vocabulary: {ids}")


def image_processor_config(image_size: int = 112) -> dict:
    """Qwen2.5-VL's preprocessor_config.json with the pixel budget scaled to ``image_size``**2."""
    factor = PATCH_SIZE * MERGE_SIZE
    if image_size % factor:
        raise ValueError(f"image_size must be a multiple of {factor}, got {image_size}")
    max_pixels = image_size * image_size
    min_pixels = min(QWEN_MIN_PIXELS, max_pixels)
    return {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": list(IMAGE_MEAN),
        "image_std": list(IMAGE_STD),
        "image_processor_type": "Qwen2VLImageProcessor",
        "max_pixels": max_pixels,
        "merge_size": MERGE_SIZE,
        "min_pixels": min_pixels,
        "patch_size": PATCH_SIZE,
        "processor_class": "Qwen2_5_VLProcessor",
        "resample": 3,  # PIL bicubic
        "rescale_factor": 1 / 255,
        "size": {"longest_edge": max_pixels, "shortest_edge": min_pixels},
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
    }


def write_tokenizer_files(
    tokenizer: PreTrainedTokenizerFast,
    out_dir: str | os.PathLike,
    *,
    image_size: int = 112,
    model_max_length: int | None = None,
) -> None:
    """Write tokenizer.json, tokenizer_config.json, chat_template.jinja, special_tokens_map.json
    and preprocessor_config.json into ``out_dir`` (created if missing; files are overwritten)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_special_ids(tokenizer)
    max_len = model_max_length or tokenizer.model_max_length
    if not isinstance(max_len, int) or max_len > 10**9:
        max_len = DEFAULT_MODEL_MAX_LENGTH

    tok_json = json.loads(tokenizer.backend_tokenizer.to_str())
    (out / "tokenizer.json").write_text(
        json.dumps(tok_json, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )

    added = {
        str(item["id"]): {
            "content": item["content"],
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": item["special"],
        }
        for item in tok_json["added_tokens"]
    }
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": list(_ADDITIONAL_SPECIAL_TOKENS),
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "extra_special_tokens": list(_ADDITIONAL_SPECIAL_TOKENS),
        "mask_token": MASK_TOKEN,
        "model_max_length": max_len,
        "pad_token": "<|endoftext|>",
        "processor_class": "Qwen2_5_VLProcessor",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
        "chat_template": CHAT_TEMPLATE,
    }
    _write_json(out / "tokenizer_config.json", config)
    # transformers >= 4.50 / 5.x read the template from here (processor and tokenizer alike).
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    _write_json(
        out / "special_tokens_map.json",
        {
            "additional_special_tokens": list(_ADDITIONAL_SPECIAL_TOKENS),
            "eos_token": {
                "content": "<|im_end|>",
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
            },
            "pad_token": {
                "content": "<|endoftext|>",
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
            },
        },
    )
    _write_json(out / "preprocessor_config.json", image_processor_config(image_size))


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def load_tokenizer(model_dir: str | os.PathLike):
    """Load the tokenizer written by :func:`write_tokenizer_files` (offline)."""
    from transformers import AutoTokenizer

    from fast_dvlm_sglang.sglang_plugin.hf_config import register_config

    register_config()  # AutoTokenizer reads config.json: our class, not the checkpoint's code
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def load_image_processor(model_dir: str | os.PathLike):
    """The PIL (torchvision-free) Qwen2-VL image processor configured from preprocessor_config.json."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    cfg = json.loads((Path(model_dir) / "preprocessor_config.json").read_text(encoding="utf-8"))
    kwargs = {
        k: cfg[k]
        for k in ("do_convert_rgb", "do_normalize", "do_rescale", "do_resize", "rescale_factor", "resample")
        if k in cfg
    }
    # Pass a fresh `size` dict: Qwen2VLImageProcessorPil.__init__ otherwise mutates its class default.
    size = {"shortest_edge": cfg.get("min_pixels", QWEN_MIN_PIXELS), "longest_edge": cfg["max_pixels"]}
    return Qwen2VLImageProcessorPil(
        size=size,
        patch_size=cfg.get("patch_size", PATCH_SIZE),
        temporal_patch_size=cfg.get("temporal_patch_size", TEMPORAL_PATCH_SIZE),
        merge_size=cfg.get("merge_size", MERGE_SIZE),
        image_mean=list(cfg.get("image_mean", IMAGE_MEAN)),
        image_std=list(cfg.get("image_std", IMAGE_STD)),
        **kwargs,
    )


def load_processor(model_dir: str | os.PathLike):
    """A Qwen2.5-VL processor (tokenizer + PIL image processor, no video), offline, no torchvision.

    ``AutoProcessor``/``AutoImageProcessor`` cannot be used here: in transformers 5 both insist on
    torchvision (the auto class and ``Qwen2VLVideoProcessor`` are torchvision-gated).
    """
    tokenizer = load_tokenizer(model_dir)
    image_processor = load_image_processor(model_dir)
    processor = Qwen2_5_VLImageTextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template or CHAT_TEMPLATE,
    )
    processor.video_frame_bounds = video_frame_bounds(model_dir)
    return processor


class Qwen2_5_VLImageTextProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` without the video processor (which needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
