"""Video clips -> Qwen2.5-VL video inputs: the one rule the reference and the server share.

A clip goes through four steps, each a plain function:

1. `probe`: the container header (frame count, frame rate, size), read with PyAV without decoding
   a frame. Corrupt, empty and non-video payloads fail here, as `VideoError`.
2. `plan_frames`: which frames to keep and at what size, under a `VideoPolicy` (frame rate, frame
   count, total pixels, duration). Qwen2.5-VL's rule (qwen-vl-utils, and SGLang's Qwen-VL
   `preprocess_video`): frames sampled at `fps` from the whole clip, an even count (two frames
   make one temporal patch), spread with `linspace` over the clip; each frame resized to a
   multiple of 28 within the per-frame pixel bounds and the clip's share of the pixel budget.
   Over a cap the clip is sampled down (fewer frames, then smaller frames); a clip that cannot
   fit, or is longer than `max_seconds`, is refused before any frame is decoded.
3. `decode_frames`: only the planned frames are converted (PyAV decodes up to the last one).
4. `resize_frames` + `video_patches`: bilinear, antialiased resize of the uint8 frames (what
   `torchvision.transforms.functional.resize` computes), then rescale, normalize and temporal
   patching exactly as transformers' `Qwen2VLVideoProcessor` does.

`second_per_grid_t` (seconds per temporal patch, for M-RoPE's time axis) is
`temporal_patch_size / sampled_fps`, `sampled_fps = frames kept / frames in the clip * clip fps`.

The server runs steps 1-3 in SGLang's media loader (`sglang_plugin/video_input.py`) and hands
SGLang the resized frames; transformers' video processor then does step 4 there. So the server and
`fast-dvlm generate --video` see the same pixels, with no torchvision in the reference environment.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "ClipInfo",
    "FramePlan",
    "VideoError",
    "VideoInputs",
    "VideoPolicy",
    "clip_bytes",
    "decode_frames",
    "encode_clip",
    "frame_pixel_bounds",
    "frame_size",
    "load_video",
    "moving_square_frames",
    "plan_frames",
    "probe",
    "resize_frames",
    "smart_resize",
    "video_frame_bounds",
    "video_patches",
]

FRAME_FACTOR = 2  # frames per temporal patch (Qwen2.5-VL's temporal_patch_size)
IMAGE_FACTOR = 28  # patch_size * merge_size: frame sides are multiples of it
VIDEO_MIN_PIXELS = 128 * 28 * 28  # qwen-vl-utils' per-frame bounds for video
VIDEO_MAX_PIXELS = 768 * 28 * 28
MAX_RATIO = 200


class VideoError(ValueError):
    """A clip that cannot be served: its message is the client's (an HTTP 400 on the server)."""


@dataclass(frozen=True)
class VideoPolicy:
    """Per-request video caps (`fast-dvlm serve --video-fps/--max-video-frames/...`).

    fps: frames sampled per second of video (Qwen2.5-VL's default 2).
    max_frames: frames kept per clip; a longer clip is sampled more sparsely.
    max_pixels: pixels of all kept frames of a request, after resizing (video tokens =
        max_pixels / (2 * 28 * 28)); shared evenly by the clips of a request.
    max_seconds: longest clip accepted (decoding cost grows with duration even when few frames
        are kept); 0 = no limit.
    max_frame_pixels: largest source frame (width * height) accepted; 0 = no limit.
    min_frame_pixels / max_resized_frame_pixels: the bounds one resized frame keeps to.
    """

    fps: float = 2.0
    max_frames: int = 32
    max_pixels: int = 8192 * FRAME_FACTOR * IMAGE_FACTOR * IMAGE_FACTOR
    max_seconds: float = 60.0
    max_frame_pixels: int = 0
    min_frame_pixels: int = VIDEO_MIN_PIXELS
    max_resized_frame_pixels: int = VIDEO_MAX_PIXELS

    def __post_init__(self) -> None:
        if not self.fps > 0:
            raise ValueError(f"video fps must be > 0, got {self.fps}")
        if self.max_frames < FRAME_FACTOR:
            raise ValueError(f"max video frames must be >= {FRAME_FACTOR}, got {self.max_frames}")
        if self.max_pixels < 2 * FRAME_FACTOR * self.min_frame_pixels:
            raise ValueError(
                f"max video pixels {self.max_pixels} is below two frames of twice the minimum frame size "
                f"({2 * FRAME_FACTOR} x {self.min_frame_pixels})"
            )

    def share(self, n_videos: int) -> VideoPolicy:
        """The policy one of `n_videos` clips of a request gets (the pixel budget split evenly)."""
        from dataclasses import replace

        if n_videos <= 1:
            return self
        share = self.max_pixels // n_videos
        if share < 2 * FRAME_FACTOR * self.min_frame_pixels:
            raise VideoError(f"{n_videos} videos do not fit this server's budget of {self.max_pixels} video pixels "
                             f"per request (--max-video-pixels): each needs at least "
                             f"{2 * FRAME_FACTOR * self.min_frame_pixels}.")
        return replace(self, max_pixels=share)


def frame_pixel_bounds(processor_size) -> tuple[int, int]:
    """Per-frame (min, max) pixels for video: qwen-vl-utils' bounds (100 k .. 602 k) inside the
    checkpoint's processor bounds (`shortest_edge`/`longest_edge`, what transformers' video processor
    resizes to), the minimum kept at most half the maximum so that sizes between them exist.
    `plan_frames` makes every frame a size transformers' resize leaves as it is."""
    def field(name):
        value = processor_size.get(name) if isinstance(processor_size, dict) else getattr(processor_size, name, None)
        return int(value) if value else None

    lo, hi = 0, 1 << 62
    if processor_size is not None:
        lo = field("shortest_edge") or field("min_pixels") or lo
        hi = field("longest_edge") or field("max_pixels") or hi
    upper = min(hi, VIDEO_MAX_PIXELS)
    lower = max(lo, min(VIDEO_MIN_PIXELS, upper // 2))
    return lower, upper


def video_frame_bounds(model_dir: str | Path) -> tuple[int, int]:
    """Per-frame pixel bounds for video (`frame_pixel_bounds`) from the checkpoint's video
    processor config: `video_preprocessor_config.json`, else `preprocessor_config.json`, the file
    transformers' video processor falls back to (so the server's frames are sized the same).
    Reads JSON only: `fast-dvlm serve` checks its video caps with it before SGLang starts."""
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        path = Path(model_dir) / name
        if path.is_file():
            cfg = json.loads(path.read_text())
            size = cfg.get("size") or {"shortest_edge": cfg.get("min_pixels"), "longest_edge": cfg.get("max_pixels")}
            return frame_pixel_bounds(size)
    return frame_pixel_bounds(None)


@dataclass(frozen=True)
class ClipInfo:
    frames: int  # frames in the video stream (from the header, or duration * rate)
    fps: float  # average frame rate
    width: int
    height: int

    @property
    def seconds(self) -> float:
        return self.frames / self.fps


@dataclass(frozen=True)
class FramePlan:
    indices: tuple[int, ...]  # frames kept, increasing
    height: int  # resized frame size
    width: int
    sampled_fps: float  # frames kept per second of video

    @property
    def second_per_grid_t(self) -> float:
        return FRAME_FACTOR / self.sampled_fps

    def metadata(self, info: ClipInfo) -> dict:
        """transformers' `VideoMetadata` fields for these frames (its `sampled_fps` is ours)."""
        return {"total_num_frames": info.frames, "fps": info.fps, "duration": info.seconds,
                "frames_indices": list(self.indices), "width": info.width, "height": info.height}


@dataclass(frozen=True)
class VideoInputs:
    pixel_values_videos: torch.Tensor  # (grid_t * grid_h * grid_w, C * 2 * 14 * 14), float32
    video_grid_thw: torch.Tensor  # (3,), int64
    second_per_grid_t: float


# ---- 1. the header -------------------------------------------------------------------------------
def clip_bytes(ref) -> bytes:
    """A clip's bytes from bytes, a data: URL, a path or file:// URL, or an OpenAI-style {"url": ...}."""
    if isinstance(ref, dict):
        ref = ref.get("url")
    if isinstance(ref, (bytes, bytearray)):
        return bytes(ref)
    if isinstance(ref, Path):
        ref = str(ref)
    if isinstance(ref, str):
        if ref.startswith("data:"):
            _, sep, payload = ref.partition(",")
            try:
                return base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                raise VideoError("Video data URL is not valid base64.") from None
        if ref.startswith("file://"):
            ref = ref[len("file://") :]
        if "://" in ref:
            raise VideoError(f"remote videos are not supported offline: {ref[:80]!r}")
        try:
            return Path(ref).read_bytes()
        except OSError as e:
            raise VideoError(f"cannot read video {ref!r}: {e.strerror}") from None
    raise VideoError(f"unsupported video reference: {type(ref).__name__}")


def _open(data: bytes):
    import av

    if not data:
        raise VideoError("Video payload is empty.")
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, ValueError, OSError) as e:
        raise VideoError(f"Could not decode video: not a video container ({type(e).__name__}).") from None
    if not container.streams.video:
        container.close()
        raise VideoError("Could not decode video: the payload has no video stream.")
    return container


def probe(data: bytes) -> ClipInfo:
    """Frame count, rate and size from the header; no frame is decoded."""
    with _open(data) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        frames = int(stream.frames or 0)
        if frames <= 0 and fps > 0:  # containers without a frame count (webm, some mkv)
            if stream.duration is not None and stream.time_base is not None:
                seconds = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                seconds = container.duration / 1_000_000
            else:
                seconds = 0.0
            frames = int(round(seconds * fps))
        width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
    if frames <= 0 or fps <= 0:
        raise VideoError("Could not decode video: it has no frames.")
    if width <= 0 or height <= 0:
        raise VideoError("Could not decode video: its frame size is unknown.")
    return ClipInfo(frames=frames, fps=fps, width=width, height=height)


# ---- 2. the plan ---------------------------------------------------------------------------------
def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's resize rule: sides rounded to multiples of `factor`, area within the bounds,
    aspect ratio kept (transformers' and SGLang's `smart_resize`)."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise VideoError(f"Video frames must have an aspect ratio below {MAX_RATIO}, got {width} x {height}.")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def frame_size(height: int, width: int, min_pixels: int, max_pixels: int) -> tuple[int, int] | None:
    """Qwen's `smart_resize` where its result lies within [min_pixels, max_pixels] (the usual case);
    otherwise (its rounding can leave the bounds when they are close) the grid size within them
    whose aspect ratio is nearest the frame's, the larger on a tie (a search over at most
    max_pixels / 784 cells: only tight bounds get here). None when there is none.

    Every size returned is one transformers' own resize keeps (sides multiples of 28, area within
    the checkpoint's bounds, `frame_pixel_bounds`), so its frames are resized once, by us."""
    if max_pixels < min_pixels:
        return None
    h, w = smart_resize(height, width, IMAGE_FACTOR, min_pixels, max_pixels)
    if min_pixels <= h * w <= max_pixels:
        return h, w
    target = math.log(height / width)
    best = None
    cells = max_pixels // (IMAGE_FACTOR * IMAGE_FACTOR)  # 28 x 28 cells in the largest frame
    for gh in range(1, cells + 1):
        h = gh * IMAGE_FACTOR
        for gw in range(max(1, -(-min_pixels // (h * IMAGE_FACTOR))), cells // gh + 1):
            w = gw * IMAGE_FACTOR
            if min_pixels <= h * w <= max_pixels and max(h, w) / min(h, w) <= MAX_RATIO:
                key = (abs(math.log(h / w) - target), -h * w)
                if best is None or key < best[0]:
                    best = (key, (h, w))
    return best[1] if best else None


def _floor_even(x: float) -> int:
    return int(math.floor(x / FRAME_FACTOR) * FRAME_FACTOR)


def plan_frames(info: ClipInfo, policy: VideoPolicy) -> FramePlan:
    """The frames to keep and their size, or a `VideoError` naming the cap the clip exceeds."""
    if policy.max_seconds and info.seconds > policy.max_seconds:
        raise VideoError(f"Video is {info.seconds:.1f} s long; this server accepts clips up to "
                         f"{policy.max_seconds:g} s (--max-video-seconds).")
    if policy.max_frame_pixels and info.width * info.height > policy.max_frame_pixels:
        raise VideoError(f"Video frames of {info.width} x {info.height} = {info.width * info.height} pixels exceed "
                         f"this server's limit of {policy.max_frame_pixels} pixels per frame (--max-image-pixels).")
    if info.frames < FRAME_FACTOR:
        raise VideoError(f"Video has {info.frames} frame; at least {FRAME_FACTOR} are needed.")
    # Frame count: `fps` frames per second, at least 4 (Qwen's FPS_MIN_FRAMES), at most the caps.
    wanted = info.frames / info.fps * policy.fps
    budget_frames = policy.max_pixels // policy.min_frame_pixels  # frames that fit at the smallest size
    upper = _floor_even(min(policy.max_frames, info.frames, budget_frames))
    nframes = _floor_even(min(max(wanted, 4), upper))
    nframes = max(nframes, FRAME_FACTOR)
    if nframes > info.frames:  # pragma: no cover - guarded by `upper`
        raise VideoError(f"Video has {info.frames} frames; at least {FRAME_FACTOR} are needed.")
    indices = np.unique(np.linspace(0, info.frames - 1, num=nframes, dtype=np.int64))
    if len(indices) % FRAME_FACTOR:  # cannot happen for nframes <= frames; kept as a guard
        indices = indices[: len(indices) - len(indices) % FRAME_FACTOR]
    # Frame size: within the per-frame bounds and this clip's share of the pixel budget; where no
    # grid size of the clip's shape fits that share, fewer frames (each pair of frames fewer
    # leaves the rest more room).
    while True:
        per_frame = min(policy.max_resized_frame_pixels, policy.max_pixels // len(indices))
        size = frame_size(info.height, info.width, policy.min_frame_pixels, per_frame)
        if size is not None or len(indices) <= FRAME_FACTOR:
            break
        indices = np.unique(np.linspace(0, info.frames - 1, num=len(indices) - FRAME_FACTOR, dtype=np.int64))
    if size is None:
        raise VideoError(f"Video frames of {info.width} x {info.height} cannot be resized within this server's "
                         f"budget of {policy.max_pixels} pixels per request (--max-video-pixels).")
    height, width = size
    sampled_fps = len(indices) / info.frames * info.fps
    return FramePlan(indices=tuple(int(i) for i in indices), height=height, width=width, sampled_fps=sampled_fps)


# ---- 3. decoding ---------------------------------------------------------------------------------
def decode_frames(data: bytes, indices: tuple[int, ...] | list[int]) -> torch.Tensor:
    """The frames at `indices` as uint8 [T, 3, H, W] (RGB); decoding stops after the last one."""
    import av

    wanted = set(indices)
    last = max(indices)
    frames: dict[int, np.ndarray] = {}
    with _open(data) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    frames[i] = frame.to_ndarray(format="rgb24")
                if i >= last:
                    break
        except (av.FFmpegError, ValueError) as e:
            raise VideoError(f"Could not decode video: frame {len(frames)} is corrupt ({type(e).__name__}).") from None
    if len(frames) < len(wanted):
        raise VideoError(f"Could not decode video: it holds fewer frames than its header says "
                         f"({len(frames)} of the {len(wanted)} sampled were found).")
    stacked = np.stack([frames[i] for i in sorted(wanted)])
    return torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous()


# ---- 4. pixels -----------------------------------------------------------------------------------
def resize_frames(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 [T, C, H, W] -> uint8 [T, C, height, width]: bilinear with antialiasing, computed in
    float and rounded, as `torchvision.transforms.functional.resize` does for uint8 tensors."""
    if tuple(frames.shape[-2:]) == (height, width):
        return frames
    out = torch.nn.functional.interpolate(frames.float(), size=(height, width), mode="bilinear",
                                          align_corners=False, antialias=True)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def video_patches(frames: torch.Tensor, *, mean, std, rescale_factor: float = 1 / 255, patch_size: int = 14,
                  merge_size: int = 2, temporal_patch_size: int = FRAME_FACTOR) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescaled, normalized, patched frames and their grid, as `Qwen2VLVideoProcessor` lays them out:
    (grid_t * grid_h * grid_w, C * temporal_patch * patch * patch) in merge-window order. Rescale and
    normalization are fused as transformers fuses them (mean and std scaled by 1 / rescale_factor),
    so the values are bit-identical to its output."""
    t, c, h, w = frames.shape
    mean = torch.tensor(mean) * (1.0 / rescale_factor)
    std = torch.tensor(std) * (1.0 / rescale_factor)
    x = (frames.to(torch.float32) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    if pad := -t % temporal_patch_size:  # repeat the last frame, as transformers does
        x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
        t += pad
    gt, gh, gw = t // temporal_patch_size, h // patch_size, w // patch_size
    x = x.view(gt, temporal_patch_size, c, gh // merge_size, merge_size, patch_size,
               gw // merge_size, merge_size, patch_size)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    patches = x.reshape(gt * gh * gw, c * temporal_patch_size * patch_size * patch_size)
    return patches, torch.tensor([gt, gh, gw], dtype=torch.long)


def load_video(ref, policy: VideoPolicy, image_processor) -> VideoInputs:
    """One clip -> the model's video inputs (the reference's path; `image_processor` gives the
    normalization and patch sizes of the checkpoint)."""
    data = clip_bytes(ref)
    info = probe(data)
    plan = plan_frames(info, policy)
    frames = resize_frames(decode_frames(data, plan.indices), plan.height, plan.width)
    pixel_values, grid = video_patches(
        frames, mean=image_processor.image_mean, std=image_processor.image_std,
        rescale_factor=getattr(image_processor, "rescale_factor", 1 / 255), patch_size=image_processor.patch_size, merge_size=image_processor.merge_size,
        temporal_patch_size=image_processor.temporal_patch_size,
    )
    return VideoInputs(pixel_values_videos=pixel_values, video_grid_thw=grid,
                       second_per_grid_t=plan.second_per_grid_t)


def encode_clip(frames, fps: float = 4.0, *, codec: str = "libx264", container: str = "mp4") -> bytes:
    """uint8 RGB frames [T, H, W, 3] (even H and W) -> an encoded clip (tests and benchmarks make
    their clips with this; H.264 in MP4 by default, as cameras write them)."""
    from fractions import Fraction

    import av

    frames = np.asarray(frames, dtype=np.uint8)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def moving_square_frames(n: int, height: int = 64, width: int = 96, seed: int = 0) -> np.ndarray:
    """A square crossing a plain background, one position per frame (synthetic test footage)."""
    rng = np.random.default_rng(seed)
    frames = np.empty((n, height, width, 3), np.uint8)
    frames[:] = rng.integers(0, 256, 3, dtype=np.uint8)
    color = rng.integers(0, 256, 3, dtype=np.uint8)
    side = max(4, min(height, width) // 4)
    for i in range(n):
        x = int(i * (width - side) / max(n - 1, 1))
        y = (height - side) // 2
        frames[i, y : y + side, x : x + side] = color
    return frames
