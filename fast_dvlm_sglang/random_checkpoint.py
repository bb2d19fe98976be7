"""A random-weights checkpoint with the real Fast-dVLM 3B shapes, built locally (nothing downloaded).

The GPU acceptance check (`benchmarks/gpu_smoke.sh`) serves it to exercise the real kernels,
CUDA graphs and memory footprint at full size: text tower of Qwen2.5-VL-3B (36 layers, hidden
2048, 16 query / 2 KV heads of 128, SwiGLU 11008, vocabulary 151936, tied embeddings, M-RoPE
[16, 24, 24]) and its vision tower (depth 32, width 1280, full attention at 7/15/23/31). The
tokenizer is the demo model's (512 tokens with the released special tokens and chat template);
embedding rows past it are zero, so their logits are exactly 0 and greedy decoding stays inside
the tokenizer's vocabulary (the largest of ~500 random logits is positive). Random weights accept
almost no drafts: on this checkpoint only crashes, parity (spec == AR, tie-aware) and graph ==
eager are meaningful, not tokens/NFE.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .checkpoint import save_checkpoint
from .config import FastDVLMConfig
from .tiny import fast_dvlm_config

FAST_DVLM_3B_TEXT = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                         num_key_value_heads=2, mrope_section=[16, 24, 24])
FAST_DVLM_3B_VISION: dict = {}  # `fast_dvlm_config`'s vision defaults are Qwen2.5-VL-3B's
FAST_DVLM_3B_VOCAB = 151936
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "preprocessor_config.json")


def random_config(*, text: dict | None = None, vision: dict | None = None, vocab_size: int = FAST_DVLM_3B_VOCAB,
                  dtype: torch.dtype = torch.bfloat16) -> dict:
    """config.json of the random checkpoint: the 3B shapes unless `text`/`vision` override them,
    the demo tokenizer's special token ids."""
    from .demo import DEMO_CHECKPOINT
    from .tokenizer import SPECIAL_TOKENS, load_processor

    tokenizer = load_processor(DEMO_CHECKPOINT).tokenizer
    if vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {vocab_size} < the tokenizer's {len(tokenizer)} tokens")
    token_ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    config = fast_dvlm_config(token_ids, vocab_size, **{**FAST_DVLM_3B_TEXT, **(text or {})},
                              vision={**FAST_DVLM_3B_VISION, **(vision or {})}, tie_word_embeddings=True)
    config["torch_dtype"] = str(dtype).replace("torch.", "")
    if not text:
        config.update(max_position_embeddings=128000, sliding_window=32768, max_window_layers=70)
    return config


def make_random_checkpoint(out_dir: str | Path, *, seed: int = 0, text: dict | None = None, vision: dict | None = None,
                           vocab_size: int = FAST_DVLM_3B_VOCAB, dtype: torch.dtype = torch.bfloat16,
                           std: float = 0.02, embed_std: float = 0.05, device: str = "cpu",
                           max_shard_bytes: int | None = 4 << 30) -> Path:
    """Write the checkpoint (config.json, sharded safetensors in `dtype`, tokenizer files).

    Matrices and biases ~ N(0, std), norms 1, embeddings ~ N(0, embed_std) (tied with lm_head; a
    larger std than the blocks' makes the logits less flat). `text`/`vision` override the shapes
    (tests use a small config). Deterministic for a seed and device."""
    from .demo import DEMO_CHECKPOINT
    from .model import FastDVLMForConditionalGeneration
    from .tokenizer import load_processor

    config = random_config(text=text, vision=vision, vocab_size=vocab_size, dtype=dtype)
    n_real = len(load_processor(DEMO_CHECKPOINT).tokenizer)
    cfg = FastDVLMConfig.from_dict(config)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in FastDVLMForConditionalGeneration(cfg).state_dict().items()}
    gen = torch.Generator(device=device).manual_seed(seed)
    state = {}
    embed_key = "model.language_model.embed_tokens.weight"
    for key in sorted(shapes):
        if key == "lm_head.weight":
            continue  # tied
        shape = shapes[key]
        if key.endswith(("norm.weight", "norm1.weight", "norm2.weight", "ln_q.weight")):
            t = torch.ones(shape, device=device)
        else:
            t = torch.randn(shape, generator=gen, device=device) * (embed_std if key == embed_key else std)
        if key == embed_key:
            t[n_real:] = 0
        state[key] = t.to(dtype).cpu()
    extra = {name: (DEMO_CHECKPOINT / name).read_bytes() for name in TOKENIZER_FILES
             if (DEMO_CHECKPOINT / name).is_file()}
    token_ids = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    extra["generation_config.json"] = json.dumps({**token_ids, "eos_token_id": [config["eos_token_id"],
                                                  config["bos_token_id"]], "do_sample": False}, indent=2) + "\n"
    return save_checkpoint(state, config, out_dir, max_shard_bytes=max_shard_bytes, extra_files=extra)


def ensure_random_checkpoint(out_dir: str | Path, **kwargs) -> Path:
    """`make_random_checkpoint` unless `out_dir` already holds one (a rebuild takes minutes at 3B)."""
    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    if out_dir.exists():
        shutil.rmtree(out_dir)
    return make_random_checkpoint(out_dir, **kwargs)
