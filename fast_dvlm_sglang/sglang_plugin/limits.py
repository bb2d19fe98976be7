"""What a client may send: the server's request limits and media source policy, one frozen record.

`fast-dvlm serve` passes its flags to every SGLang process as `FAST_DVLM_*` environment
variables (SGLang's own argument parser knows nothing of them; an environment variable reaches
the HTTP process, the tokenizer manager and the multimodal loaders alike). A server started with
plain `python -m sglang.launch_server` gets the defaults below: secure unless told otherwise.

Defaults, and why:
- `max_request_bytes` 32 MiB: a handful of camera frames as PNG or JPEG data URLs (base64 adds a
  third) fits; text never needs it (the 3B's 128k-token context is under 1 MB of text). The body
  is counted as it arrives, before anything parses it (`http_guard.py`).
- `max_images` 16 per request, `max_image_pixels` 16.8 M (4096 x 4096) per decoded image: Qwen2.5-VL
  resizes to at most 12.8 M pixels anyway, so nothing useful is lost, and a decompression bomb
  (a tiny PNG that decodes to gigabytes) is refused from its header (`media_policy.py`);
  `max_request_pixels` 67 M (four such images) for all images of a request together, about 200 MB
  decoded as RGB (sixteen 1080p camera frames are 33 M). Images fetched from URLs are checked one
  by one where SGLang decodes them (their size is unknown before).
- video (`video.py` applies them; README: Video input): `max_videos` 4 clips per request;
  `video_fps` 2 frames sampled per second (Qwen2.5-VL's rate); `max_video_frames` 32 frames
  per clip (16 s at 2 fps; a longer clip is sampled more sparsely); `max_video_pixels` 12.8 M
  pixels of resized frames per request, i.e. at most 8192 video tokens (about 300 MB of BF16 KV
  on the 3B, 36 KiB per token), over it frames are made smaller, then fewer; `max_video_seconds`
  60: decoding reads the clip up to its last sampled frame, so a long clip costs CPU time even
  when few frames are kept, and is refused from its header. Source frames larger than
  `max_image_pixels` are refused like images.
- `request_read_timeout_s` 60: the whole body must arrive within it (408 otherwise), so a slow
  upload cannot hold a connection and its buffer for ever.
- media sources: `data:` URLs only. `allowed_local_media_path` DIR admits files inside DIR;
  `allow_media_urls` admits http(s) URLs whose every address (and every redirect's) is public,
  unless the host is named in SGLang's own `--allowed-media-domains` list.
"""

from __future__ import annotations

import dataclasses
import os
from functools import cache

ENV = {
    "max_request_bytes": "FAST_DVLM_MAX_REQUEST_BYTES",
    "max_images": "FAST_DVLM_MAX_IMAGES",
    "max_image_pixels": "FAST_DVLM_MAX_IMAGE_PIXELS",
    "max_request_pixels": "FAST_DVLM_MAX_REQUEST_PIXELS",
    "allowed_local_media_path": "FAST_DVLM_ALLOWED_LOCAL_MEDIA_PATH",
    "allow_media_urls": "FAST_DVLM_ALLOW_MEDIA_URLS",
    "request_read_timeout_s": "FAST_DVLM_REQUEST_READ_TIMEOUT_S",
    "max_videos": "FAST_DVLM_MAX_VIDEOS",
    "video_fps": "FAST_DVLM_VIDEO_FPS",
    "max_video_frames": "FAST_DVLM_MAX_VIDEO_FRAMES",
    "max_video_pixels": "FAST_DVLM_MAX_VIDEO_PIXELS",
    "max_video_seconds": "FAST_DVLM_MAX_VIDEO_SECONDS",
}
_FLOATS = ("request_read_timeout_s", "video_fps", "max_video_seconds")


@dataclasses.dataclass(frozen=True)
class ServingLimits:
    max_request_bytes: int = 32 * 1024 * 1024  # 0: no limit (for all three)
    max_images: int = 16
    max_image_pixels: int = 4096 * 4096
    max_request_pixels: int = 4 * 4096 * 4096
    allowed_local_media_path: str | None = None  # a resolved directory
    allow_media_urls: bool = False
    request_read_timeout_s: float = 60.0  # the whole body must arrive within this
    max_videos: int = 4
    video_fps: float = 2.0
    max_video_frames: int = 32
    max_video_pixels: int = 8192 * 2 * 28 * 28
    max_video_seconds: float = 60.0  # 0: no limit

    def video_policy(self, frame_bounds: tuple[int, int]):
        """These caps as the `video.VideoPolicy` of a checkpoint with these per-frame bounds."""
        from ..video import VideoPolicy

        return VideoPolicy(fps=self.video_fps, max_frames=self.max_video_frames, max_pixels=self.max_video_pixels,
                           max_seconds=self.max_video_seconds, max_frame_pixels=self.max_image_pixels,
                           min_frame_pixels=frame_bounds[0], max_resized_frame_pixels=frame_bounds[1])

    def env(self) -> dict[str, str]:
        """The environment that makes every SGLang process read these limits."""
        out = {}
        for field, var in ENV.items():
            value = getattr(self, field)
            if value is None:
                continue
            out[var] = str(int(value)) if isinstance(value, bool) else str(value)
        return out

    @classmethod
    def from_env(cls, environ=None) -> ServingLimits:
        environ = os.environ if environ is None else environ
        kwargs = {}
        for field in dataclasses.fields(cls):
            raw = environ.get(ENV[field.name])
            if raw is None or raw == "":
                continue
            if field.name == "allowed_local_media_path":
                kwargs[field.name] = raw
            elif field.name == "allow_media_urls":
                kwargs[field.name] = raw.strip().lower() in ("1", "true", "yes")
            elif field.name in _FLOATS:
                try:
                    kwargs[field.name] = float(raw)
                except ValueError:
                    raise ValueError(f"{ENV[field.name]} must be a number, got {raw!r}") from None
            else:
                try:
                    kwargs[field.name] = int(raw)
                except ValueError:
                    raise ValueError(f"{ENV[field.name]} must be an integer, got {raw!r}") from None
        return cls(**kwargs).checked()

    def checked(self) -> ServingLimits:
        for name in ("max_request_bytes", "max_images", "max_image_pixels", "max_request_pixels", "max_videos",
                     "max_video_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        from ..video import VideoPolicy

        try:  # the caps themselves (the per-frame bounds come from the checkpoint later)
            VideoPolicy(fps=self.video_fps, max_frames=self.max_video_frames, max_pixels=self.max_video_pixels,
                        min_frame_pixels=0)
        except ValueError as e:
            raise ValueError(str(e)) from None
        if not self.request_read_timeout_s > 0:
            raise ValueError(f"request_read_timeout_s must be > 0, got {self.request_read_timeout_s}")
        path = self.allowed_local_media_path
        if path is not None:
            real = os.path.realpath(path)
            if not os.path.isdir(real):
                raise ValueError(f"allowed local media path {path!r} is not a directory")
            return dataclasses.replace(self, allowed_local_media_path=real)
        return self


@cache
def current() -> ServingLimits:
    """This process's limits (read once: the environment is set before SGLang starts)."""
    return ServingLimits.from_env()
