"""Calibration samples for the quantizer, through the model's real processor.

Sources: `demo` (the demo task's images and chats, a seed apart from training and evaluation), or
a JSONL file (or a directory holding `calibration.jsonl`) of records
`{"prompt": str, "image": path (optional, relative to the file), "answer": str (optional)}`.

Each record gives forwards of the two attention modes the server runs (`modes`):
- `causal`: the conversation (prompt and answer) under a causal mask, as a prefill, an AR step
  or a verify pass sees it;
- `draft`: the prompt and half the answer as causal context, then one block `[next token,
  MASK x (block - 1)]` attending to the context and to itself both ways, as a speculative draft
  (or MDM) pass sees it. Mask-token embeddings and bidirectional attention give activation
  statistics a causal pass never shows.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from fast_dvlm_sglang.attention_masks import causal_mask
from fast_dvlm_sglang.config import FastDVLMConfig

CALIBRATION_SEED = 7  # demo split for calibration (training is seed 0; eval-demo defaults to 1234)
HELD_OUT_SEED = 8  # the report's held-out prompts
MODES = ("causal", "draft")
# Measured on the demo model (benchmarks/results/fp8_quality_cpu_demo.json, 64 records, 8 held-out
# forwards per mode): calibrating on causal forwards only gave the better FP8 on both modes (top-1
# agreement causal 0.991 vs 0.968, draft 1.000 vs 0.992; draft KL 0.0027 vs 0.0068) than adding
# the draft forwards, whose mask-token activations pull SmoothQuant's scales toward channels that
# matter little. With dynamic per-token activation scales, calibration only sets SmoothQuant's
# per-channel statistics, so causal forwards (what most tokens see) are the default.
DEFAULT_MODES = ("causal",)


class CalibrationError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Record:
    prompt: str
    image: str | Path | None = None  # a path or a PIL image
    answer: str | None = None


def demo_records(n: int, seed: int = CALIBRATION_SEED) -> Iterator[tuple[list[dict], str | None]]:
    from fast_dvlm_sglang.demo.shapes import make_sample

    for i in range(n):
        s = make_sample(seed, i)
        yield s.prompt_messages, s.answer


def _file_records(path: Path) -> list[Record]:
    file = path / "calibration.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise CalibrationError(f"calibration data {path}: no such file (expected a JSONL file or a directory "
                               "with calibration.jsonl)")
    records = []
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CalibrationError(f"calibration data {file}: unreadable ({e})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except ValueError:
            raise CalibrationError(f"{file}:{number}: not a JSON object") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("prompt"), str) or not raw["prompt"]:
            raise CalibrationError(f"{file}:{number}: a record needs a non-empty string 'prompt'")
        image = raw.get("image")
        if image is not None:
            image = (file.parent / image) if not Path(image).is_absolute() else Path(image)
            if not image.is_file():
                raise CalibrationError(f"{file}:{number}: image {image} not found")
        records.append(Record(raw["prompt"], image, raw.get("answer")))
    if not records:
        raise CalibrationError(f"calibration data {file} has no records")
    return records


def chats(source: str, n: int, seed: int = CALIBRATION_SEED) -> list[tuple[list[dict], str | None]]:
    """(prompt messages, answer or None) for `n` records of `source` ('demo' or a path)."""
    if source == "demo":
        return list(demo_records(n, seed))
    out = []
    for r in _file_records(Path(source))[:n]:
        content = [{"type": "text", "text": r.prompt}]
        if r.image is not None:
            from PIL import Image

            try:
                with Image.open(r.image) as img:
                    image = img.convert("RGB")
            except OSError as e:
                raise CalibrationError(f"calibration image {r.image}: not a readable image ({e})") from None
            content.insert(0, {"type": "image", "image": image})
        out.append(([{"role": "user", "content": content}], r.answer))
    return out


def encode(processor, cfg: FastDVLMConfig, prompt: list[dict], answer: str | None, mode: str,
           max_seq_len: int) -> dict | None:
    """One calibration forward: input_ids [1, T], pixel values, grids and a [T, T] boolean mask."""
    from fast_dvlm_sglang.processing import encode_chat

    enc = encode_chat(processor, prompt, add_generation_prompt=True)
    ids = list(enc.input_ids)
    answer_ids = processor.tokenizer(answer, add_special_tokens=False)["input_ids"] if answer else []
    if mode == "causal":
        ids = ids + answer_ids
        mask = causal_mask(len(ids))
    elif mode == "draft":
        cut = len(answer_ids) // 2
        ids = ids + answer_ids[:cut]
        block = [answer_ids[cut] if cut < len(answer_ids) else cfg.mask_token_id]
        block += [cfg.mask_token_id] * (cfg.block_size - 1)
        context = len(ids)
        ids = ids + block
        mask = causal_mask(len(ids))
        mask[context:, :] = True  # the block sees all context and itself
    else:
        raise CalibrationError(f"unknown calibration mode {mode!r} (expected one of {', '.join(MODES)})")
    if len(ids) > max_seq_len:
        return None  # too long to calibrate on (an image's tokens cannot be cut)
    sample = {"input_ids": torch.tensor([ids]), "attention_mask": mask}
    if enc.pixel_values is not None:
        sample["pixel_values"] = enc.pixel_values
        sample["image_grid_thw"] = enc.image_grid_thw
    return sample


def samples(processor, cfg: FastDVLMConfig, source: str, n: int, *, modes=DEFAULT_MODES, max_seq_len: int = 2048,
            seed: int = CALIBRATION_SEED) -> list[dict]:
    """`n` records' forwards in every mode of `modes` (records too long for `max_seq_len` are
    skipped); an error if none is left."""
    out = []
    for prompt, answer in chats(source, n, seed):
        for mode in modes:
            sample = encode(processor, cfg, prompt, answer, mode, max_seq_len)
            if sample is not None:
                sample["mode"] = mode
                out.append(sample)
    if not out:
        raise CalibrationError(f"no calibration sample fits --max-seq-len {max_seq_len}")
    return out
