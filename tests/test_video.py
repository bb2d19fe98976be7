"""Video in the reference: clips decoded with PyAV, Qwen2.5-VL's frame sampling and sizing under the
caps, M-RoPE's time axis, and `fast-dvlm generate --video`. (Bit-equality with transformers' video
processor and SGLang's M-RoPE, and the server, are in tests/sglang/test_video.py: transformers'
video processor needs torchvision, which this environment does not have.)"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from fast_dvlm_sglang.video import (
    ClipInfo,
    VideoError,
    VideoPolicy,
    clip_bytes,
    decode_frames,
    encode_clip,
    frame_pixel_bounds,
    moving_square_frames,
    plan_frames,
    probe,
    resize_frames,
    smart_resize,
)

DEMO_BOUNDS = frame_pixel_bounds({"shortest_edge": 3136, "longest_edge": 7056})
QWEN_BOUNDS = frame_pixel_bounds({"shortest_edge": 3136, "longest_edge": 12845056})  # Qwen2.5-VL-3B's file


@pytest.mark.parametrize("codec,container", [("libx264", "mp4"), ("mpeg4", "mp4"), ("libvpx-vp9", "webm")])
def test_probe_and_decode_return_the_encoded_frames(codec, container):
    frames = moving_square_frames(10, height=48, width=80, seed=3)
    data = encode_clip(frames, fps=5, codec=codec, container=container)
    info = probe(data)
    assert (info.frames, info.fps, info.width, info.height) == (10, 5.0, 80, 48)
    got = decode_frames(data, [0, 4, 9])
    assert got.shape == (3, 3, 48, 80) and got.dtype == torch.uint8
    # lossy codecs: close to the source frames (mean error a few levels), and in the right order
    want = torch.from_numpy(frames[[0, 4, 9]]).permute(0, 3, 1, 2).float()
    errors = (got.float() - want).abs().mean(dim=(1, 2, 3))
    assert errors.max() < 12, errors
    shuffled = (got.float() - want[[2, 0, 1]]).abs().mean(dim=(1, 2, 3))
    assert (shuffled > errors).all()


@pytest.mark.parametrize("payload,message", [
    (b"", "empty"),
    (b"\x00garbage" * 64, "not a video container"),
    (None, "no video stream|no frames"),  # a PNG image (FFmpeg opens it as a frameless stream)
])
def test_bad_payloads_are_video_errors(payload, message):
    if payload is None:
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, format="PNG")
        payload = buf.getvalue()
    with pytest.raises(VideoError, match=message):
        probe(payload)


def test_truncated_clip_is_a_video_error():
    data = encode_clip(moving_square_frames(30), fps=10)
    info = probe(data)
    with pytest.raises(VideoError):
        cut = data[: len(data) // 2]
        decode_frames(cut, list(range(info.frames)))


def test_clip_bytes_sources(tmp_path):
    data = encode_clip(moving_square_frames(4), fps=2)
    path = tmp_path / "c.mp4"
    path.write_bytes(data)
    import base64

    url = "data:video/mp4;base64," + base64.b64encode(data).decode()
    assert clip_bytes(url) == clip_bytes(str(path)) == clip_bytes("file://" + str(path)) == clip_bytes({"url": url})
    with pytest.raises(VideoError, match="base64"):
        clip_bytes("data:video/mp4;base64,@@@")
    with pytest.raises(VideoError, match="remote"):
        clip_bytes("https://example.com/a.mp4")
    with pytest.raises(VideoError, match="cannot read"):
        clip_bytes(str(tmp_path / "missing.mp4"))


def test_sampling_follows_qwen_rule():
    """2 fps over the clip, an even count, at least 4, spread with linspace (hand-worked cases)."""
    policy = VideoPolicy(min_frame_pixels=DEMO_BOUNDS[0], max_resized_frame_pixels=DEMO_BOUNDS[1])
    # 10 s at 30 fps: 20 frames at 2 fps, linspace over 300 frames
    plan = plan_frames(ClipInfo(300, 30.0, 96, 64), policy)
    assert plan.indices == tuple(int(i) for i in np.linspace(0, 299, 20).astype(np.int64))
    assert math.isclose(plan.sampled_fps, 2.0) and math.isclose(plan.second_per_grid_t, 1.0)
    # 1 s at 8 fps: 2 frames at 2 fps, raised to the minimum of 4
    plan = plan_frames(ClipInfo(8, 8.0, 96, 64), policy)
    assert plan.indices == (0, 2, 4, 7) and math.isclose(plan.second_per_grid_t, 2 / (4 / 8 * 8))
    # 3 frames: an even count, 2
    assert len(plan_frames(ClipInfo(3, 1.0, 96, 64), policy).indices) == 2


def test_a_long_clip_is_sampled_down_to_max_frames():
    policy = VideoPolicy(max_frames=8, max_seconds=0, min_frame_pixels=DEMO_BOUNDS[0],
                         max_resized_frame_pixels=DEMO_BOUNDS[1])
    plan = plan_frames(ClipInfo(3000, 25.0, 640, 480), policy)  # 120 s: 240 frames at 2 fps
    assert len(plan.indices) == 8 and plan.indices[0] == 0 and plan.indices[-1] == 2999
    assert math.isclose(plan.sampled_fps, 8 / 120)


def test_caps_refuse_with_the_flag_named():
    policy = VideoPolicy(max_seconds=10, max_frame_pixels=1920 * 1080)
    with pytest.raises(VideoError, match="--max-video-seconds"):
        plan_frames(ClipInfo(301, 30.0, 96, 64), policy)
    with pytest.raises(VideoError, match="--max-image-pixels"):
        plan_frames(ClipInfo(30, 30.0, 3840, 2160), policy)
    with pytest.raises(VideoError, match="at least 2"):
        plan_frames(ClipInfo(1, 30.0, 96, 64), policy)
    with pytest.raises(VideoError, match="--max-video-pixels"):
        VideoPolicy().share(100)
    with pytest.raises(ValueError):
        VideoPolicy(max_pixels=1000)


@pytest.mark.parametrize("bounds", [DEMO_BOUNDS, QWEN_BOUNDS])
def test_plans_fit_the_budget_and_are_fixed_points_of_the_processor_resize(bounds):
    """Property over random clips and caps: an even frame count within max_frames, all kept frames
    within the pixel budget, and a frame size transformers' `smart_resize` (with the checkpoint's
    own bounds) maps to itself, so the server's processor does not resize our frames again."""
    hf_bounds = (3136, 7056) if bounds == DEMO_BOUNDS else (3136, 12845056)
    rng = random.Random(0)
    refused = 0
    for _ in range(1500):
        height, width = rng.randint(16, 2200), rng.randint(16, 2200)
        if max(height, width) / min(height, width) > 100:
            continue
        lo = bounds[0]
        policy = VideoPolicy(min_frame_pixels=lo, max_resized_frame_pixels=bounds[1], max_seconds=0,
                             max_frames=rng.choice([2, 4, 32, 64]), fps=rng.choice([0.5, 2.0, 8.0]),
                             max_pixels=rng.choice([4 * lo, 7 * lo, 8192 * 1568]))
        info = ClipInfo(rng.randint(2, 400), rng.choice([1.0, 10.0, 25.0, 29.97, 60.0]), width, height)
        try:
            plan = plan_frames(info, policy)
        except VideoError:
            refused += 1  # only shapes no grid size within the checkpoint's bounds can hold
            assert max(height, width) / min(height, width) > 2
            continue
        n = len(plan.indices)
        assert n % 2 == 0 and 2 <= n <= max(2, policy.max_frames)
        assert list(plan.indices) == sorted(set(plan.indices)) and plan.indices[-1] < info.frames
        assert n * plan.height * plan.width <= policy.max_pixels
        assert plan.height % 28 == 0 and plan.width % 28 == 0
        assert smart_resize(plan.height, plan.width, 28, *hf_bounds) == (plan.height, plan.width)
    assert refused < 150


def test_resize_is_bilinear_antialiased_and_rounded():
    frames = torch.randint(0, 256, (2, 3, 50, 70), dtype=torch.uint8)
    out = resize_frames(frames, 28, 56)
    want = torch.nn.functional.interpolate(frames.double(), size=(28, 56), mode="bilinear", antialias=True,
                                           align_corners=False).round().clamp(0, 255)
    assert out.dtype == torch.uint8 and (out.double() - want).abs().max() <= 1
    assert resize_frames(frames, 50, 70) is frames


def test_mrope_video_time_axis_hand_worked():
    """Text, a video of merged grid (t=3, h=2, w=2) at 0.75 s per temporal patch and 2 tokens per
    second (times 0, 1.5, 3.0 -> positions 0, 1, 3), then text at the block's max + 1."""
    from fast_dvlm_sglang.model import mrope_positions

    class Cfg:
        image_token_id, video_token_id, spatial_merge_size, tokens_per_second = 7, 8, 2, 2.0

    ids = torch.tensor([[1, 2] + [8] * 12 + [3, 4]])
    pos = mrope_positions(ids, None, Cfg, torch.tensor([[3, 4, 4]]), [0.75])[:, 0]
    t = [0, 0, 0, 0, 1, 1, 1, 1, 3, 3, 3, 3]
    hw = [(0, 0), (0, 1), (1, 0), (1, 1)] * 3
    assert pos[:, :2].tolist() == [[0, 1]] * 3
    assert pos[0, 2:14].tolist() == [2 + x for x in t]
    assert pos[1, 2:14].tolist() == [2 + h for h, _ in hw]
    assert pos[2, 2:14].tolist() == [2 + w for _, w in hw]
    assert pos[:, 14:].tolist() == [[6, 7]] * 3  # max(2 + 3, 2 + 1) + 1


def _generate(*args):
    return subprocess.run([sys.executable, "-m", "fast_dvlm_sglang.cli", "generate", "--model", "demo", *args],
                          capture_output=True, text=True, timeout=300)


def test_cli_generate_with_a_video(tmp_path):
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(encode_clip(moving_square_frames(8), fps=4))
    runs = {}
    for algorithm in ("ar", "spec"):
        r = _generate("--prompt", "What happens in the video?", "--video", str(clip), "--algorithm", algorithm,
                      "--max-new-tokens", "24", "--json")
        assert r.returncode == 0, r.stderr
        runs[algorithm] = json.loads(r.stdout.splitlines()[-1])
    assert runs["ar"]["token_ids"] and runs["spec"]["nfe"] <= runs["ar"]["nfe"]
    r = _generate("--prompt", "x", "--video", str(tmp_path / "missing.mp4"))
    assert r.returncode == 2 and "no such file" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video" * 10)
    r = _generate("--prompt", "x", "--video", str(bad))
    assert r.returncode == 2 and "not a video container" in r.stderr and "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def demo():
    from fast_dvlm_sglang.demo import DEMO_CHECKPOINT
    from fast_dvlm_sglang.model import FastDVLMForConditionalGeneration
    from fast_dvlm_sglang.tokenizer import load_processor

    return FastDVLMForConditionalGeneration.from_pretrained(DEMO_CHECKPOINT), load_processor(DEMO_CHECKPOINT)


def _video_prompt(processor, n_frames, fps, seed, with_image=False):
    from fast_dvlm_sglang.decoding import Prompt
    from fast_dvlm_sglang.processing import encode_chat

    content = [{"type": "video", "video": encode_clip(moving_square_frames(n_frames, seed=seed), fps=fps)}]
    if with_image:
        from PIL import Image

        content.insert(0, {"type": "image", "image": Image.new("RGB", (56, 56), "red")})
    content.append({"type": "text", "text": "What happens in the video?"})
    return Prompt.from_encoded(encode_chat(processor, [{"role": "user", "content": content}]))


def test_video_prompts_spec_equals_ar_and_positions_continue(demo):
    """Greedy spec == greedy AR (tie-aware) on clips of 1, 2 and 8 temporal patches, a clip beside an
    image; generated tokens continue at the prompt's max position + 1 (the server's
    mrope_position_delta)."""
    from tie_aware import TieAware

    from fast_dvlm_sglang.decoding import GenerationConfig, generate

    model, processor = demo
    prompts = [_video_prompt(processor, n, fps, seed) for n, fps, seed in ((2, 1, 0), (8, 4, 1), (16, 2, 2))]
    prompts.append(_video_prompt(processor, 8, 4, 3, with_image=True))
    tie_aware = TieAware(model, prompts[:2], n_tokens=32)
    grids = []
    for i, prompt in enumerate(prompts):
        grids.append(prompt.video_grid_thw[0, 0].item())
        positions = prompt.embed_and_positions(model)[1]
        assert int(positions.max()) + 1 < len(prompt.input_ids)  # time and space compress positions
        ar = generate(model, prompt, GenerationConfig("ar", max_new_tokens=40, eos_token_ids=()))
        spec = generate(model, prompt, GenerationConfig("spec", max_new_tokens=40, eos_token_ids=()))
        tie_aware.check(prompt, ar.token_ids, spec.token_ids, f"video prompt {i}")
    assert sorted(set(grids)) == [1, 2, 8]  # 2 s at 1 fps (2 frames), 2 s at 4 fps (4), 8 s at 2 fps (16)


def test_vision_tower_splits_a_clip_into_temporal_patches(demo):
    """The reference's vision tower is transformers' Qwen2.5-VL tower; on it a clip's grid (t, h, w)
    and the same grid as t rows of (1, h, w) give the same features: each temporal patch is its
    own attention span, with the same windows and rotary positions. The server's model class feeds
    SGLang's tower the split grid (`sglang_plugin/model.get_video_feature`) for that reason."""
    from fast_dvlm_sglang.processing import encode_chat

    model, processor = demo
    clip = encode_clip(moving_square_frames(16, height=96, width=128, seed=5), fps=4)
    enc = encode_chat(processor, [{"role": "user", "content": [{"type": "video", "video": clip}]}])
    grid = enc.video_grid_thw
    assert int(grid[0, 0]) == 4
    split = torch.repeat_interleave(grid, grid[:, 0], dim=0)
    split[:, 0] = 1
    with torch.no_grad():
        whole = model.model.visual(enc.pixel_values_videos, grid_thw=grid).pooler_output
        parts = model.model.visual(enc.pixel_values_videos, grid_thw=split).pooler_output
    assert torch.equal(whole, parts)
