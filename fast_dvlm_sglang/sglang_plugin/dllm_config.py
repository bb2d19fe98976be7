"""DllmConfig for Fast-dVLM: block size and mask id read from the checkpoint.

SGLang's `DllmConfig.from_server_args` (sglang/srt/dllm/config.py) knows block size and mask id
only for a hard-coded table of architectures; `from_server_args_hook` (an AROUND hook) answers
for ours and defers to SGLang for every other architecture.
- block size: config.json `bd_size` (default 32); `block_size` in --dllm-algorithm-config
  overrides it, as for SGLang's own models;
- mask id: config.json `mask_token_id`, else the tokenizer's `|<MASK>|` token; none: refused.
"""

from __future__ import annotations

import json
import os

from fast_dvlm_sglang.config import ARCHITECTURE, DEFAULT_BLOCK_SIZE, MASK_TOKEN


def mask_id_from_tokenizer(tokenizer_path: str) -> int | None:
    path = os.path.join(tokenizer_path, "tokenizer.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            tok = json.load(f)
        for added in tok.get("added_tokens", []):
            if added.get("content") == MASK_TOKEN:
                return int(added["id"])
        vocab = (tok.get("model") or {}).get("vocab") or {}
        if isinstance(vocab, dict) and MASK_TOKEN in vocab:
            return int(vocab[MASK_TOKEN])
        return None
    try:
        from transformers import AutoTokenizer

        from .hf_config import register_config

        register_config()
        t = AutoTokenizer.from_pretrained(tokenizer_path)
    except Exception:
        return None
    tid = t.convert_tokens_to_ids(MASK_TOKEN)
    return None if tid is None or tid == t.unk_token_id else int(tid)


def block_params(hf_config, tokenizer_path: str) -> tuple[int, int]:
    block_size = int(getattr(hf_config, "bd_size", None) or DEFAULT_BLOCK_SIZE)
    mask_id = getattr(hf_config, "mask_token_id", None)
    if mask_id is None:
        mask_id = mask_id_from_tokenizer(tokenizer_path)
    if mask_id is None:
        raise RuntimeError(
            f"{ARCHITECTURE}: no mask token: config.json has no mask_token_id and the tokenizer at "
            f"{tokenizer_path!r} has no {MASK_TOKEN!r} token; diffusion decoding needs one "
            "(serve without --dllm-algorithm for autoregressive decoding)"
        )
    return block_size, int(mask_id)


def from_server_args_hook(original, server_args):
    from sglang.srt.arg_groups.overrides import resolving_view
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.dllm.algorithm import get_algorithm_cls
    from sglang.srt.dllm.config import DllmConfig

    cfg = resolving_view(server_args)
    if cfg.dllm_algorithm is None:
        return original(server_args)
    model_config = ModelConfig.from_server_args(server_args, model_path=cfg.model_path, model_revision=cfg.revision)
    archs = getattr(model_config.hf_config, "architectures", None) or []
    if not archs or archs[0] != ARCHITECTURE:
        return original(server_args)

    block_size, mask_id = block_params(model_config.hf_config, cfg.tokenizer_path or cfg.model_path)
    algorithm_cls = get_algorithm_cls(cfg.dllm_algorithm)
    if algorithm_cls.supported_architectures and ARCHITECTURE not in algorithm_cls.supported_architectures:
        raise ValueError(f"{cfg.dllm_algorithm} does not support model architecture {ARCHITECTURE}")
    algorithm_config = {}
    if cfg.dllm_algorithm_config is not None:
        import yaml

        with open(cfg.dllm_algorithm_config) as f:
            algorithm_config = yaml.safe_load(f) or {}
        if not isinstance(algorithm_config, dict):
            raise ValueError("The dLLM algorithm config must be a YAML mapping")
        block_size = int(algorithm_config.get("block_size", block_size))
    return DllmConfig(
        algorithm=cfg.dllm_algorithm,
        algorithm_config=algorithm_config,
        block_size=block_size,
        mask_id=mask_id,
        max_running_requests=1 if cfg.max_running_requests is None else cfg.max_running_requests,
        first_done_first_out_mode=cfg.dllm_fdfo,
        requires_separate_context_encoding=algorithm_cls.requires_separate_context_encoding,
        capture_input_preparation=False,
    )
