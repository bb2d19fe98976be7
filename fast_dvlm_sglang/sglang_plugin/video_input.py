"""Video clips on a Fast-dVLM server: loaded with PyAV, sampled and resized by `video.py` under the
serving caps, then handed to SGLang's Qwen2.5-VL path as frames with their metadata.

SGLang 0.5.23's own video path does not serve this model on a machine without CUDA, nor right:
- its loader (`utils/common.py:load_video`) opens clips with torchcodec (FFmpeg's shared
  libraries must be on the machine) or decord, asks for a CUDA decoder, and pins host memory
  (`utils/video_decoder.py`, `qwen_vl.preprocess_video`): a 500 on a machine without CUDA;
- for `qwen2_5_vl` it calls transformers' processor without the clip's metadata, so
  `second_per_grid_ts` comes out as 2 / 24 (transformers' default frame rate) instead of
  2 / sampled fps, and M-RoPE's time axis is compressed 12x at 2 fps;
- its caps are module constants and environment variables, applied after every sampled frame
  is decoded.

Our processor class (`processor.py`, registered for our architecture only: no other model's
video path changes) therefore
1. loads a clip as a `Clip` (bytes + header, `video.probe`) in SGLang's io threads
   (`_load_single_item`): a corrupt, empty or non-video payload is a `ValueError` there, which
   SGLang answers with a 400;
2. plans every clip of the request under the caps (`limits.ServingLimits.video_policy`, the pixel
   budget shared by the request's clips), refusing with a 400 naming the cap before decoding, then
   decodes and resizes the planned frames in the io threads (`prepare_clips`); a tensor of frames
   makes SGLang's `preprocess_video` pass the clip through untouched (no CUDA, no pinning);
3. gives transformers the clips' metadata (`processor_kwargs`), so `second_per_grid_ts` is the
   sampled rate's and SGLang's M-RoPE (`mrope_rope_index.get_rope_index`) places time as
   Qwen2.5-VL does. Normalization and patching are transformers'; `video.video_patches` is its
   bit-identical twin for the reference.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from ..video import ClipInfo, VideoError, decode_frames, frame_pixel_bounds, plan_frames, probe, resize_frames
from .limits import current

METADATA_ATTR = "fast_dvlm_video_metadata"  # on SGLang's per-request BaseMultiModalProcessorOutput


@dataclass(frozen=True)
class Clip:
    """A clip as loaded: its bytes and header (no frame decoded yet)."""

    data: bytes
    info: ClipInfo


def load_clip(source) -> Clip:
    """SGLang's video item (a data URL, base64, an allowed path or a fetched URL) -> `Clip`."""
    from sglang.srt.utils.common import get_video_bytes

    try:
        data = get_video_bytes(source)
    except (ValueError, OSError) as e:  # bad base64, unreadable file: the client's
        raise VideoError(f"Could not read video: {e}") from None
    return Clip(data=data, info=probe(data))


def frame_bounds(hf_processor) -> tuple[int, int]:
    """The checkpoint's per-frame pixel bounds (its video processor's size, as transformers reads it)."""
    video_processor = getattr(hf_processor, "video_processor", None)
    size = getattr(video_processor, "size", None) or getattr(getattr(hf_processor, "image_processor", None), "size", None)
    return frame_pixel_bounds(size)


def _frames(clip: Clip, plan):
    return resize_frames(decode_frames(clip.data, plan.indices), plan.height, plan.width)


async def prepare_clips(base_output, hf_processor, executor) -> None:
    """Replace the request's `Clip`s by their planned, resized frames (uint8 [T, C, H, W]) and record
    their metadata on `base_output` (`METADATA_ATTR`), in clip order."""
    videos = base_output.videos or []
    clips = [v for v in videos if isinstance(v, Clip)]
    if not clips:
        return
    if len(clips) != len(videos):
        raise ValueError("A request cannot mix preprocessed videos with video files.")
    policy = current().video_policy(frame_bounds(hf_processor)).share(len(clips))
    plans = [plan_frames(clip.info, policy) for clip in clips]  # all refusals before any decoding
    loop = asyncio.get_running_loop()
    frames = await asyncio.gather(*(loop.run_in_executor(executor, _frames, clip, plan)
                                    for clip, plan in zip(clips, plans)))
    base_output.videos = list(frames)
    setattr(base_output, METADATA_ATTR, [plan.metadata(clip.info) for clip, plan in zip(clips, plans)])


def processor_kwargs(base_output) -> dict:
    """transformers' processor arguments for the clips `prepare_clips` made (none without clips)."""
    metadata = getattr(base_output, METADATA_ATTR, None)
    if not metadata:
        return {}
    # Frames are sampled and resized already: transformers must neither resample nor cap them.
    return {"video_metadata": metadata, "do_sample_frames": False, "cap_pixels_per_frame": False}
