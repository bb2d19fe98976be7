"""Chats -> model inputs, shared by the CLI, evaluation and training.

Text is rendered with the tokenizer's (Qwen2.5-VL) chat template and tokenized once, unexpanded;
then each ``<|image_pad|>`` and ``<|video_pad|>`` is expanded to ``t*h*w / merge_size**2`` copies,
exactly as ``Qwen2_5_VLProcessor`` does. Expanding ids rather than text keeps the character
offsets of the rendered template valid, which ``encode_training_conversation`` uses to find the
assistant spans. Clips go through `video.py` (PyAV frames, Qwen2.5-VL's sampling and resizing,
the video processor's patching) under a `VideoPolicy`.

Only ``processor.tokenizer`` and ``processor.image_processor`` (a Qwen2-VL image processor) are
used, so any processor-like object with those two attributes works; an optional
``processor.video_frame_bounds`` (per-frame pixel bounds, `tokenizer.load_processor`) sizes frames.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .video import VideoInputs, VideoPolicy, frame_pixel_bounds, load_video

__all__ = [
    "EncodedChat",
    "EncodedConversation",
    "encode_chat",
    "encode_training_conversation",
    "extract_images",
    "extract_videos",
    "render_chat",
    "video_policy",
]

IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
IM_END = "<|im_end|>"
ASSISTANT_PREFIX = "<|im_start|>assistant\n"


@dataclass(frozen=True)
class EncodedChat:
    input_ids: list[int]
    pixel_values: torch.Tensor | None  # (num_patches, C * temporal_patch * patch * patch), float32
    image_grid_thw: torch.Tensor | None  # (num_images, 3), int64
    pixel_values_videos: torch.Tensor | None = None  # (num_video_patches, C * 2 * patch * patch)
    video_grid_thw: torch.Tensor | None = None  # (num_videos, 3), int64
    second_per_grid_ts: tuple[float, ...] | None = None  # seconds per temporal patch, per video


@dataclass(frozen=True)
class EncodedConversation:
    input_ids: list[int]
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    labels_mask: list[bool]  # True on assistant response tokens and their closing <|im_end|>
    turn_ids: list[int]  # index of the assistant turn (0, 1, ...) of each response token, -1 elsewhere


def _load_image(ref) -> Image.Image:
    if isinstance(ref, Image.Image):
        return ref
    if isinstance(ref, dict):  # OpenAI style {"url": ...}
        ref = ref.get("url")
    if isinstance(ref, bytes):
        return Image.open(io.BytesIO(ref))
    if isinstance(ref, str):
        if ref.startswith("data:"):
            _, _, payload = ref.partition(",")
            return Image.open(io.BytesIO(base64.b64decode(payload)))
        if ref.startswith("file://"):
            ref = ref[len("file://") :]
        if "://" in ref:
            raise ValueError(f"remote images are not supported offline: {ref[:80]!r}")
        return Image.open(Path(ref))
    raise TypeError(f"unsupported image reference: {type(ref).__name__}")


def _is_image_part(part: dict) -> bool:
    # Same test as the chat template.
    return part.get("type") == "image" or "image" in part or "image_url" in part


def _is_video_part(part: dict) -> bool:
    # The chat template's test, plus OpenAI's `video_url` parts (rendered as videos by
    # `_template_parts`).
    return part.get("type") in ("video", "video_url") or "video" in part or "video_url" in part


def _parts(messages: list[dict]):
    for msg in messages:
        content = msg["content"]
        if not isinstance(content, str):
            yield from content


def extract_images(messages: list[dict]) -> list[Image.Image]:
    """The images of a conversation, in template order, as RGB PIL images."""
    images = []
    for part in _parts(messages):
        if _is_image_part(part):
            ref = part.get("image") if part.get("image") is not None else part.get("image_url")
            images.append(_load_image(ref).convert("RGB"))
    return images


def video_policy(processor, **caps) -> VideoPolicy:
    """The checkpoint's per-frame bounds with the given caps (`VideoPolicy` fields)."""
    bounds = getattr(processor, "video_frame_bounds", None)
    if bounds is None:
        bounds = frame_pixel_bounds(getattr(processor.image_processor, "size", None))
    return VideoPolicy(min_frame_pixels=bounds[0], max_resized_frame_pixels=bounds[1], **caps)


def extract_videos(messages: list[dict], processor, policy: VideoPolicy | None = None) -> list[VideoInputs]:
    """The clips of a conversation, in template order, as the model's video inputs."""
    refs = []
    for part in _parts(messages):
        if _is_video_part(part) and not _is_image_part(part):
            ref = part.get("video") if part.get("video") is not None else part.get("video_url")
            refs.append(ref)
    if not refs:
        return []
    policy = (policy or video_policy(processor)).share(len(refs))
    return [load_video(ref, policy, processor.image_processor) for ref in refs]


def _template_parts(messages: list[dict]) -> list[dict]:
    # The template knows `{"type": "video"}`; OpenAI clients send `video_url` parts.
    out = []
    for msg in messages:
        content = msg["content"]
        if not isinstance(content, str):
            content = [{"type": "video"} if _is_video_part(p) and not _is_image_part(p) else p for p in content]
        out.append({**msg, "content": content})
    return out


def render_chat(processor, messages: list[dict], *, add_generation_prompt: bool) -> str:
    tokenizer = getattr(processor, "tokenizer", processor)
    return tokenizer.apply_chat_template(
        _template_parts(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _process_images(processor, images: list[Image.Image]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if not images:
        return None, None
    out = processor.image_processor(images=images, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def _expand_image_pads(
    processor, ids: list[int], grid_thw: torch.Tensor | None, *extra: list,
    video_grid_thw: torch.Tensor | None = None,
) -> tuple[list[int], ...]:
    """Repeat each image (video) pad id t*h*w/merge^2 times; ``extra`` per-token lists are
    repeated alongside."""
    tokenizer = processor.tokenizer
    merge = processor.image_processor.merge_size
    counts: dict[int, list[int]] = {}
    for token, grids, what in ((IMAGE_PAD, grid_thw, "image"), (VIDEO_PAD, video_grid_thw, "video")):
        pad_id = tokenizer.convert_tokens_to_ids(token)
        n_pads = sum(1 for t in ids if t == pad_id)
        n_items = 0 if grids is None else len(grids)
        if n_pads != n_items:
            raise ValueError(f"{n_pads} {what} placeholders in the text but {n_items} {what}s")
        if n_items:
            counts[pad_id] = [int(g.prod()) // (merge * merge) for g in grids]
    if not counts:
        return (list(ids), *(list(e) for e in extra))
    out_ids: list[int] = []
    out_extra: list[list] = [[] for _ in extra]
    seen = dict.fromkeys(counts, 0)
    for i, t in enumerate(ids):
        reps = 1
        if t in counts:
            reps = counts[t][seen[t]]
            seen[t] += 1
        out_ids.extend([t] * reps)
        for dst, src in zip(out_extra, extra):
            dst.extend([src[i]] * reps)
    return (out_ids, *out_extra)


def _stack_videos(videos: list[VideoInputs]):
    if not videos:
        return None, None, None
    return (torch.cat([v.pixel_values_videos for v in videos]), torch.stack([v.video_grid_thw for v in videos]),
            tuple(v.second_per_grid_t for v in videos))


def encode_chat(processor, messages: list[dict], *, add_generation_prompt: bool = True,
                video_policy: VideoPolicy | None = None) -> EncodedChat:
    """Token ids (image and video pads expanded), pixel values and grids for an OpenAI/HF-format chat."""
    text = render_chat(processor, messages, add_generation_prompt=add_generation_prompt)
    pixel_values, grid_thw = _process_images(processor, extract_images(messages))
    videos, video_grid, seconds = _stack_videos(extract_videos(messages, processor, video_policy))
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    (ids,) = _expand_image_pads(processor, ids, grid_thw, video_grid_thw=video_grid)
    return EncodedChat(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid_thw,
                       pixel_values_videos=videos, video_grid_thw=video_grid, second_per_grid_ts=seconds)


def _text_of(content) -> str:
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content
                   if not _is_image_part(part) and not _is_video_part(part) and "text" in part)


def encode_training_conversation(processor, messages: list[dict]) -> EncodedConversation:
    """Like :func:`encode_chat` (no generation prompt) plus the supervision masks.

    ``labels_mask`` is True on each assistant response and its closing ``<|im_end|>``; the
    ``<|im_start|>assistant\\n`` prefix, the newline after ``<|im_end|>`` and all system/user
    tokens are False. ``turn_ids`` numbers the assistant turns 0, 1, ... (-1 elsewhere).
    """
    tokenizer = processor.tokenizer
    text = render_chat(processor, messages, add_generation_prompt=False)

    # Character spans [start, end) of every response + <|im_end|> in the rendered text.
    spans: list[tuple[int, int]] = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prefix = render_chat(processor, messages[: i + 1], add_generation_prompt=False)
        body = _text_of(msg["content"]) + IM_END
        end = prefix.rstrip("\n")
        start = len(end) - len(body)
        if not text.startswith(prefix) or end[start:] != body or not end[:start].endswith(ASSISTANT_PREFIX):
            raise ValueError(f"chat template does not render assistant turn {i} as expected")
        spans.append((start, len(end)))

    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [False] * len(ids)
    turns = [-1] * len(ids)
    for turn, (start, end) in enumerate(spans):
        for j, (a, b) in enumerate(offsets):
            if a >= start and b <= end:
                labels[j], turns[j] = True, turn
            elif a < end and b > start:
                raise ValueError(f"a token straddles the boundary of assistant turn {turn}")
    for turn in range(len(spans)):  # every turn must end with its <|im_end|>
        last = max(j for j, t in enumerate(turns) if t == turn)
        if ids[last] != tokenizer.convert_tokens_to_ids(IM_END):
            raise ValueError(f"assistant turn {turn} does not end with {IM_END}")

    pixel_values, grid_thw = _process_images(processor, extract_images(messages))
    ids, labels, turns = _expand_image_pads(processor, ids, grid_thw, labels, turns)
    return EncodedConversation(
        input_ids=ids,
        pixel_values=pixel_values,
        image_grid_thw=grid_thw,
        labels_mask=labels,
        turn_ids=turns,
    )
