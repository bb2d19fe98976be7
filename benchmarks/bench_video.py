"""The cost of a clip: video tokens, time to first token and the host-side decoding, per clip length.

    .venv-sglang/bin/python benchmarks/bench_video.py [--algorithm spec] [--repeats 3]

One server (demo model unless `--model`, default video caps) answers streamed chat requests, each a
clip of camera-like footage (`video.moving_square_frames`, H.264 in MP4) of the given length at
`--source-fps` and `--source-size`, plus a short question. For each length: the clip's frames kept
and video tokens (the server's `usage`), the median TTFT over `--repeats` requests (a new clip
each time, so nothing is served from a cache), the same request without the clip (text-only
TTFT; both after a warm-up text request and clip), and the host time of `video.py`'s probe + plan + decode + resize alone. Writes
`benchmarks/results/video_cost_<device>_<model>.json`.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _ttft(server, messages, max_tokens: int) -> tuple[float, dict]:
    client = server.client(timeout=600)
    start = time.perf_counter()
    first, usage = None, {}
    stream = client.chat.completions.create(model="default", messages=messages, max_tokens=max_tokens,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
        if chunk.usage:
            usage = chunk.usage.model_dump()
    return first if first is not None else time.perf_counter() - start, usage


def main() -> int:
    from fast_dvlm_sglang.config import resolve_model_dir
    from fast_dvlm_sglang.server_process import ServeProcess
    from fast_dvlm_sglang.sglang_plugin.limits import ServingLimits
    from fast_dvlm_sglang.video import (
        ClipInfo,
        decode_frames,
        encode_clip,
        frame_pixel_bounds,
        moving_square_frames,
        plan_frames,
        probe,
        resize_frames,
        video_frame_bounds,
    )

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--algorithm", default="spec", choices=["ar", "mdm", "spec"])
    ap.add_argument("--seconds", default="2,8,16,30")
    ap.add_argument("--source-fps", type=float, default=30.0)
    ap.add_argument("--source-size", default="320x240")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    width, height = (int(x) for x in args.source_size.split("x"))
    model_dir = resolve_model_dir(args.model)
    policy = ServingLimits().video_policy(video_frame_bounds(model_dir))
    # the 3B's processor bounds (Qwen2.5-VL-3B's preprocessor_config.json): its video tokens at the
    # same caps, computed from the plan (no 3B runs here)
    policy_3b = ServingLimits().video_policy(frame_pixel_bounds({"shortest_edge": 3136, "longest_edge": 12845056}))
    tmp = Path(tempfile.mkdtemp(prefix="bench-video-"))
    server = ServeProcess(model_dir, args.algorithm, tmp / "server.log")
    rows = []
    try:
        server.wait_ready()
        question = {"type": "text", "text": "What happens in the video?"}
        text_only = [{"role": "user", "content": [question]}]
        _ttft(server, text_only, args.max_tokens)  # warm-up: text, then a clip (the first clip of a
        warm = encode_clip(moving_square_frames(8, height, width, seed=99), fps=args.source_fps)  # server
        _ttft(server, [{"role": "user", "content": [  # run loads its processors' lazy parts)
            {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(warm).decode()}},
            question]}], args.max_tokens)
        text_ttft = statistics.median(_ttft(server, text_only, args.max_tokens)[0] for _ in range(args.repeats))
        for seconds in (float(s) for s in args.seconds.split(",")):
            n = int(round(seconds * args.source_fps))
            ttfts, usage, host = [], {}, []
            for r in range(args.repeats):
                data = encode_clip(moving_square_frames(n, height, width, seed=r), fps=args.source_fps)
                start = time.perf_counter()
                info = probe(data)
                plan = plan_frames(info, policy)
                resize_frames(decode_frames(data, plan.indices), plan.height, plan.width)
                host.append(time.perf_counter() - start)
                url = "data:video/mp4;base64," + base64.b64encode(data).decode()
                messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}}, question]}]
                ttft, usage = _ttft(server, messages, args.max_tokens)
                ttfts.append(ttft)
            details = usage.get("prompt_tokens_details") or {}
            plan_3b = plan_frames(ClipInfo(n, args.source_fps, width, height), policy_3b)
            rows.append({"clip_seconds": seconds, "source_frames": n, "clip_bytes": len(data),
                         "frames_kept": len(plan.indices), "frame_size": [plan.width, plan.height],
                         "video_tokens": details.get("video_tokens"), "prompt_tokens": usage.get("prompt_tokens"),
                         "ttft_s_median": round(statistics.median(ttfts), 4),
                         "host_decode_s_median": round(statistics.median(host), 4),
                         "fast_dvlm_3b_at_these_caps": {
                             "frames_kept": len(plan_3b.indices), "frame_size": [plan_3b.width, plan_3b.height],
                             "video_tokens": len(plan_3b.indices) // 2 * plan_3b.height * plan_3b.width // 784,
                             "bf16_kv_mib": round(len(plan_3b.indices) // 2 * plan_3b.height * plan_3b.width // 784
                                                  * 36 * 2 * 128 * 2 * 2 / 2**20, 1)}})
            print(json.dumps(rows[-1]))
    finally:
        server.stop()
    device = "cuda" if os.environ.get("CUDA_VISIBLE_DEVICES") else "cpu"
    report = {"benchmark": "video_cost", "model": args.model, "algorithm": args.algorithm, "device": device,
              "cpu_count": os.cpu_count(), "source": f"{width}x{height} at {args.source_fps:g} fps, H.264 MP4",
              "caps": {"video_fps": policy.fps, "max_frames": policy.max_frames, "max_pixels": policy.max_pixels,
                       "frame_pixels": [policy.min_frame_pixels, policy.max_resized_frame_pixels]},
              "text_only_ttft_s_median": round(text_ttft, 4), "repeats": args.repeats, "rows": rows}
    out = args.out or RESULTS / f"video_cost_{device}_{args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(report, indent=1) + "\n")
    tmp_out.replace(out)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
