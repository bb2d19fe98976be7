"""Video end to end: our frames and M-RoPE against transformers' and SGLang's own code, then clips
through real servers (`ar`, `spec`, `mdm` on the demo model) against the reference decoders.

Clips are made by the tests (`video.encode_clip`: H.264 in MP4, as cameras write them).
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import random
import re

import pytest
import torch

pytestmark = [pytest.mark.sglang, pytest.mark.many_servers]

from fast_dvlm_sglang.demo import DEMO_CHECKPOINT  # noqa: E402
from fast_dvlm_sglang.video import encode_clip, moving_square_frames  # noqa: E402

QUESTION = "What happens in the video?"
# The servers' caps (small, so that every refusal is reachable with tiny clips); the reference
# samples and sizes its clips under the same policy.
CAPS = {"video_fps": 2.0, "max_video_frames": 8, "max_video_pixels": 12 * 3528, "max_video_seconds": 5.0,
        "max_videos": 4}
SERVE_ARGS = ["--video-fps", "2", "--max-video-frames", "8", "--max-video-pixels", str(12 * 3528),
              "--max-video-seconds", "5", "--max-videos", "4"]


def clip_url(n_frames: int = 8, fps: float = 4.0, seed: int = 0, **kwargs) -> str:
    data = encode_clip(moving_square_frames(n_frames, seed=seed, **kwargs), fps=fps)
    return "data:video/mp4;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def hf_processor():
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(DEMO_CHECKPOINT))


# ---- no server: our pixels and positions are transformers' and SGLang's -------------------------
@pytest.mark.parametrize("shape", [(8, 3, 84, 84), (6, 3, 56, 112), (5, 3, 84, 56), (2, 3, 28, 224)])
def test_video_patches_are_transformers_bit_for_bit(hf_processor, shape):
    """`video.video_patches` (the reference's, no torchvision) == transformers' Qwen2VLVideoProcessor
    on the same uint8 frames (odd frame counts pad with the last frame), and the metadata we pass
    makes its second_per_grid_ts ours."""
    from fast_dvlm_sglang.video import ClipInfo, FramePlan, video_patches

    frames = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(shape[0]))
    info = ClipInfo(frames=40, fps=10.0, width=shape[3], height=shape[2])
    plan = FramePlan(indices=tuple(range(0, 40, 40 // shape[0]))[: shape[0]], height=shape[2], width=shape[3],
                     sampled_fps=shape[0] / 40 * 10.0)
    out = hf_processor(text=["<|vision_start|><|video_pad|><|vision_end|>"], videos=[frames],
                       video_metadata=[plan.metadata(info)], do_sample_frames=False, cap_pixels_per_frame=False,
                       return_tensors="pt")
    vp = hf_processor.video_processor
    patches, grid = video_patches(frames, mean=vp.image_mean, std=vp.image_std, rescale_factor=vp.rescale_factor)
    assert out["video_grid_thw"][0].tolist() == grid.tolist()
    assert torch.equal(out["pixel_values_videos"], patches)
    assert float(out["second_per_grid_ts"][0]) == pytest.approx(plan.second_per_grid_t, rel=1e-6)


def test_frame_bounds_are_the_ones_transformers_reads(hf_processor):
    from fast_dvlm_sglang.sglang_plugin.video_input import frame_bounds
    from fast_dvlm_sglang.video import video_frame_bounds

    assert frame_bounds(hf_processor) == video_frame_bounds(DEMO_CHECKPOINT)


def _random_layout(rng, cfg):
    """Token ids with 0-3 images and 0-3 videos between text runs, their grids and seconds."""
    ids, images, videos, seconds = [], [], [], []
    for _ in range(rng.randint(1, 5)):
        ids += [rng.randint(10, 300) for _ in range(rng.randint(0, 4))]
        kind = rng.choice(["image", "video", "text"])
        if kind == "text":
            continue
        t = 1 if kind == "image" else rng.randint(1, 6)
        h, w = 2 * rng.randint(1, 4), 2 * rng.randint(1, 4)
        ids += [cfg.vision_start_token_id]
        ids += [cfg.image_token_id if kind == "image" else cfg.video_token_id] * (t * h * w // 4)
        ids += [cfg.vision_start_token_id + 1]  # <|vision_end|>
        (images if kind == "image" else videos).append([t, h, w])
        if kind == "video":
            seconds.append(rng.choice([0.25, 0.5, 1.0, 1.5, 2 / 3, 4.0, 7.3]))
    ids += [rng.randint(10, 300) for _ in range(rng.randint(1, 3))]
    grid = lambda g: torch.tensor(g, dtype=torch.long) if g else None  # noqa: E731
    return torch.tensor([ids]), grid(images), grid(videos), seconds


def test_mrope_positions_equal_sglangs_on_random_layouts():
    """Our M-RoPE == SGLang's `get_rope_index` (the server's) for images, videos and both, with
    fractional seconds per temporal patch; and the position delta decode continues from."""
    from sglang.srt.layers.rotary_embedding.mrope_rope_index import get_rope_index

    from fast_dvlm_sglang.config import FastDVLMConfig
    from fast_dvlm_sglang.model import mrope_positions

    cfg = FastDVLMConfig.from_dir(DEMO_CHECKPOINT)
    rng = random.Random(0)
    seen_video = 0
    for _ in range(200):
        ids, images, videos, seconds = _random_layout(rng, cfg)
        if images is None and videos is None:
            continue
        seen_video += videos is not None
        ours = mrope_positions(ids, images, cfg, videos, seconds)
        theirs, delta = get_rope_index(cfg.spatial_merge_size, cfg.image_token_id, cfg.video_token_id,
                                       cfg.vision_start_token_id, "qwen2_5_vl", cfg.tokens_per_second, ids,
                                       images, videos, torch.tensor(seconds) if seconds else None)
        assert torch.equal(ours, theirs)
        assert int(ours.max()) + 1 - ids.shape[1] == int(delta)
    assert seen_video > 50


def test_mrope_positions_against_transformers_get_rope_index():
    """transformers 5.19's `get_rope_index` agrees on every vision token; after a video it continues
    text at start + max(h, w) / merge, ignoring the temporal axis, where Qwen2.5-VL (and SGLang, and
    we) continue at the block's max + 1 over all axes. So the two differ exactly on layouts where
    a video's temporal positions reach past its spatial extent, from the first text token after it."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    from fast_dvlm_sglang.config import FastDVLMConfig
    from fast_dvlm_sglang.model import mrope_positions

    cfg = FastDVLMConfig.from_dir(DEMO_CHECKPOINT)

    class Host:  # get_rope_index reads only these from its model
        config = type("C", (), {"vision_config": type("V", (), {
            "spatial_merge_size": cfg.spatial_merge_size, "tokens_per_second": cfg.tokens_per_second})})

        get_vision_position_ids = Qwen2_5_VLModel.get_vision_position_ids

    rng = random.Random(1)
    agree = differ = 0
    for _ in range(200):
        ids, images, videos, seconds = _random_layout(rng, cfg)
        if images is None and videos is None:
            continue
        types = torch.zeros_like(ids, dtype=torch.int)
        types[ids == cfg.image_token_id], types[ids == cfg.video_token_id] = 1, 2
        theirs, _ = Qwen2_5_VLModel.get_rope_index(Host(), ids, types, images, videos,
                                                   torch.tensor(seconds) if seconds else None)
        ours = mrope_positions(ids, images, cfg, videos, seconds)
        # where they part: the first video whose temporal span passes its spatial one, if any
        expected_split = None
        vid = 0
        for i, token in enumerate(ids[0].tolist()):
            if token == cfg.video_token_id and (i == 0 or ids[0, i - 1] != cfg.video_token_id):
                t, h, w = videos[vid].tolist()
                span = int((torch.tensor(t - 1) * torch.tensor(seconds[vid]) * cfg.tokens_per_second).long())
                if span > max(h, w) // cfg.spatial_merge_size - 1:
                    expected_split = i + t * h * w // 4
                    break
                vid += 1
        if expected_split is None:
            assert torch.equal(ours, theirs)
            agree += 1
        else:
            assert torch.equal(ours[..., :expected_split], theirs[..., :expected_split])
            assert not torch.equal(ours[..., expected_split], theirs[..., expected_split])
            differ += 1
    assert agree > 20 and differ > 20


# ---- real servers ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def servers(tmp_path_factory, tiny_checkpoints):
    """The demo model served `ar`, `spec` and `mdm`, and a random tiny checkpoint served `ar`."""
    from fast_dvlm_sglang.server_process import ServeProcess

    logs = tmp_path_factory.mktemp("video_logs")
    procs = {a: ServeProcess(DEMO_CHECKPOINT, a, logs / f"{a}.log", max_running=4, serve_args=SERVE_ARGS,
                             sglang_args=["--disable-overlap-schedule"] if a == "ar" else None)
             for a in ("ar", "spec", "mdm")}
    procs["tiny-ar"] = ServeProcess(tiny_checkpoints["new"], "ar", logs / "tiny-ar.log", max_running=4,
                                    serve_args=SERVE_ARGS, sglang_args=["--disable-overlap-schedule"])
    try:
        for proc in procs.values():
            proc.wait_ready()
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


@pytest.fixture(scope="module")
def reference():
    from tie_aware_server import ReferenceTieCheck

    from fast_dvlm_sglang.model import FastDVLMForConditionalGeneration
    from fast_dvlm_sglang.processing import video_policy
    from fast_dvlm_sglang.tokenizer import load_processor

    model = FastDVLMForConditionalGeneration.from_pretrained(DEMO_CHECKPOINT)
    proc = load_processor(DEMO_CHECKPOINT)
    policy = video_policy(proc, fps=CAPS["video_fps"], max_frames=CAPS["max_video_frames"],
                          max_pixels=CAPS["max_video_pixels"], max_seconds=CAPS["max_video_seconds"])
    return model, proc, policy, ReferenceTieCheck(model, proc, DEMO_CHECKPOINT, video_policy=policy)


def _messages(*parts, question=QUESTION):
    content = []
    for part in parts:
        key = "video_url" if part.startswith("data:video") else "image_url"
        content.append({"type": key, key: {"url": part}})
    return [{"role": "user", "content": [*content, {"type": "text", "text": question}]}]


def _ref(reference, messages, algorithm, max_new_tokens=32):
    from fast_dvlm_sglang.decoding import GenerationConfig, Prompt, generate
    from fast_dvlm_sglang.processing import encode_chat

    model, proc, policy = reference[:3]
    enc = encode_chat(proc, messages, video_policy=policy)
    prompt = Prompt.from_encoded(enc)
    return generate(model, prompt, GenerationConfig(algorithm, max_new_tokens=max_new_tokens)), enc


def _chat(server, messages, max_tokens=32, **kwargs):
    import httpx

    r = httpx.post(server.base_url + "/v1/chat/completions", timeout=300, json={
        "model": "default", "messages": messages, "max_tokens": max_tokens, "temperature": 0, **kwargs})
    return r


CLIPS = [clip_url(2, 1.0, 0), clip_url(8, 4.0, 1), clip_url(16, 8.0, 2), clip_url(10, 2.0, 3, height=48, width=128)]


def test_ar_and_mdm_servers_equal_the_reference_on_clips(servers, reference):
    """Greedy `ar` == the reference's AR and `mdm` == the reference's MDM, token for token, on clips
    of 1 to 4 temporal patches (the server's video tokens are the reference's), and a clip beside an
    image in one message."""
    from sglang_helpers import image_url

    tokenizer = reference[1].tokenizer
    cases = [_messages(c) for c in CLIPS] + [_messages(image_url("red", "ellipse"), CLIPS[1])]
    for i, messages in enumerate(cases):
        for algorithm in ("ar", "mdm"):
            want, enc = _ref(reference, messages, algorithm)
            r = _chat(servers[algorithm], messages)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["usage"]["prompt_tokens"] == len(enc.input_ids), (i, algorithm)
            assert body["choices"][0]["message"]["content"] == tokenizer.decode(want.token_ids,
                                                                                skip_special_tokens=True), (i, algorithm)


def test_tiny_random_checkpoint_ar_server_equals_the_reference_on_clips(servers, tiny_checkpoints):
    """The same on a random tiny checkpoint (its own processor bounds), through /generate's ids."""
    import httpx

    from fast_dvlm_sglang.model import FastDVLMForConditionalGeneration
    from fast_dvlm_sglang.processing import render_chat, video_policy
    from fast_dvlm_sglang.tokenizer import load_processor

    path = tiny_checkpoints["new"]
    model, proc = FastDVLMForConditionalGeneration.from_pretrained(path), load_processor(path)
    policy = video_policy(proc, fps=CAPS["video_fps"], max_frames=CAPS["max_video_frames"],
                          max_pixels=CAPS["max_video_pixels"], max_seconds=CAPS["max_video_seconds"])
    for i, url in enumerate(CLIPS):
        messages = _messages(url)
        want, enc = _ref((model, proc, policy), messages, "ar", 24)
        r = httpx.post(servers["tiny-ar"].base_url + "/generate", timeout=300, json={
            "text": render_chat(proc, messages, add_generation_prompt=True), "video_data": [url],
            "sampling_params": {"max_new_tokens": 24, "temperature": 0}})
        assert r.status_code == 200, r.text
        assert r.json()["meta_info"]["prompt_tokens"] == len(enc.input_ids), i
        assert r.json()["output_ids"] == want.token_ids, i


def test_spec_server_equals_ar_on_clips(servers, reference):
    """`spec` == the reference's greedy AR (tie-aware: the server's 32-token verify forwards and AR's
    1-token steps may part only at a measured near tie), through /generate's output ids."""
    import httpx

    from fast_dvlm_sglang.processing import render_chat

    model, proc, _, tie_check = reference
    for i, url in enumerate(CLIPS):
        messages = _messages(url)
        want, _ = _ref(reference, messages, "ar", 48)
        r = httpx.post(servers["spec"].base_url + "/generate", timeout=300, json={
            "text": render_chat(proc, messages, add_generation_prompt=True), "video_data": [url],
            "sampling_params": {"max_new_tokens": 48, "temperature": 0}})
        assert r.status_code == 200, r.text
        tie_check.check(messages, want.token_ids, r.json()["output_ids"], f"clip {i}")


def test_stream_concurrency_and_second_turn(servers, reference):
    """Streaming == non-streaming; four concurrent clip requests == each alone; a clip in the second
    turn of a conversation == the reference."""
    for algorithm in ("ar", "spec", "mdm"):
        server = servers[algorithm]
        whole = _chat(server, _messages(CLIPS[1])).json()["choices"][0]["message"]["content"]
        client = server.client()
        stream = client.chat.completions.create(model="default", messages=_messages(CLIPS[1]), max_tokens=32,
                                                temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == whole, algorithm
        solo = [_chat(server, _messages(url)).json()["choices"][0]["message"]["content"] for url in CLIPS]
        with cf.ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda url, server=server: _chat(server, _messages(url)).json(), CLIPS))
        assert [t["choices"][0]["message"]["content"] for t in together] == solo, algorithm
    tokenizer = reference[1].tokenizer
    turns = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "There are two shapes."},
             *_messages(CLIPS[3])]
    want, _ = _ref(reference, turns, "ar")
    r = _chat(servers["ar"], turns)
    assert r.json()["choices"][0]["message"]["content"] == tokenizer.decode(want.token_ids, skip_special_tokens=True)


def test_a_long_clip_is_sampled_down_to_the_frame_cap(servers, reference):
    """48 frames at 12 fps (4 s: 8 frames at 2 fps) under --max-video-frames 8 -> the reference's
    8-frame sampling; 60 frames at 12 fps would be 10 at 2 fps: also 8."""
    url = clip_url(60, 15.0, 5)  # 4 s at 15 fps
    want, enc = _ref(reference, _messages(url), "ar")
    assert enc.video_grid_thw[0, 0] == 4  # 8 frames
    body = _chat(servers["ar"], _messages(url)).json()
    assert body["usage"]["prompt_tokens"] == len(enc.input_ids)
    assert body["usage"]["prompt_tokens_details"]["video_tokens"] == int(enc.video_grid_thw.prod()) // 4


def _zero_frame_clip() -> str:
    import io

    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
    return "data:video/mp4;base64," + base64.b64encode(buf.getvalue()).decode()


def test_bad_clips_are_400s_and_the_server_stays_right(servers, tmp_path):
    good = _messages(CLIPS[1])
    before = {a: _chat(s, good).json()["choices"][0]["message"]["content"] for a, s in servers.items()
              if a != "tiny-ar"}
    path = tmp_path / "clip.mp4"
    path.write_bytes(base64.b64decode(CLIPS[1].partition(",")[2]))
    cases = {
        "corrupt": ([_messages("data:video/mp4;base64," + base64.b64encode(b"\x00\x01junk" * 99).decode())],
                    "not a video container"),
        "truncated": ([_messages(CLIPS[2][: len(CLIPS[2]) // 3])], "video"),
        "zero frames": ([_messages(_zero_frame_clip())], "no frames|empty"),  # PyAV writes no bytes for it
        "too long": ([_messages(clip_url(28, 4.0, 7))], "--max-video-seconds"),  # 7 s
        "too many videos": ([_messages(*[CLIPS[0]] * 5)], "--max-videos"),
        "truncated header": ([_messages("data:video/mp4;base64," + CLIPS[1].partition(",")[2][:200])], "video"),
        "pixel budget": ([_messages(*[CLIPS[0]] * 4)], "--max-video-pixels"),  # 4 x 2 frames x 2 x 3528 > 42336
        "local file": ([[{"role": "user", "content": [{"type": "video_url", "video_url": {"url": str(path)}},
                                                      {"type": "text", "text": "hi"}]}]], "local"),
        "remote url": ([[{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": "http://169.254.169.254/latest/clip.mp4"}},
            {"type": "text", "text": "hi"}]}]], "URL"),
        "image media type": ([[{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            {"type": "text", "text": "hi"}]}]], "video/"),
    }
    for algorithm, server in servers.items():
        if algorithm == "tiny-ar":
            continue
        for name, (args, needle) in cases.items():
            r = _chat(server, *args, max_tokens=4)
            assert r.status_code == 400, (algorithm, name, r.status_code, r.text[:300])
            error = r.json()
            message = error.get("message") or error.get("error", {}).get("message", "")
            assert re.search(needle, message, re.IGNORECASE), (algorithm, name, message)
            assert "Traceback" not in r.text
        assert server.healthy()
        assert _chat(server, good).json()["choices"][0]["message"]["content"] == before[algorithm], algorithm


def test_sglang_source_pins_for_what_we_correct():
    """The SGLang 0.5.23 behaviours our processor and model class rely on or correct (README: Video
    input). A change here means re-reading `video_input.py` and `model.get_video_feature`."""
    import inspect

    from sglang.srt.models.qwen2_5_vl import Qwen2_5_VisionTransformer
    from sglang.srt.multimodal.processors import base_processor, qwen_vl

    from fast_dvlm_sglang.sglang_plugin.processor import FastDVLMImageProcessor

    # a clip's whole t*h*w is one full-attention span in SGLang's Qwen2.5-VL tower
    assert "grid_thw[:, 0] * grid_thw[:, 1] * grid_thw[:, 2]" in inspect.getsource(Qwen2_5_VisionTransformer.forward)
    # frames (not a VideoDecoderWrapper) pass through preprocess_video untouched
    assert "return vr, None" in inspect.getsource(qwen_vl.preprocess_video)
    # qwen2_5_vl gets no video metadata from SGLang (only the qwen3 family does)
    source = inspect.getsource(qwen_vl.QwenVLImageProcessor._process_mm_data_uncached)
    assert "video_metadata=video_metadata" in source and '"qwen3_vl",' in source
    assert "self.load_mm_data(" in source and "process_and_combine_mm_data_async(" in source
    # the methods we override exist with the arguments we pass on
    base = base_processor.BaseMultimodalProcessor
    for name in ("_load_single_item", "load_mm_data", "process_and_combine_mm_data_async"):
        assert hasattr(base, name) and getattr(FastDVLMImageProcessor, name) is not getattr(base, name)
    assert list(inspect.signature(base._load_single_item).parameters)[:2] == ["data", "modality"]
    assert "io_executor" in inspect.getsource(base.__init__)
