"""`fast-dvlm serve`: SGLang's OpenAI-compatible server for Fast-dVLM, with our plugin.

    fast-dvlm serve [--model demo|PATH|HF_ID] [--algorithm ar|mdm|spec] [--host 127.0.0.1]
                    [--port 8000] [--max-running-requests N] [--api-key K]
                    [--max-request-bytes N] [--allowed-local-media-path DIR] [--allow-image-urls]
                    [-- extra SGLang args]

Runs `python -m sglang.launch_server` (the plugin loads through its entry points in every SGLang
process). Flags follow the machine: on a host without CUDA, the PyTorch CPU path (device cpu,
torch_native attention, pytorch sampling, float32, no CUDA graphs, sdpa vision attention, a
small KV pool, the scheduler sleeping while idle). `--algorithm mdm` adds `--dllm-algorithm
FastDVLMBlock` with a YAML of the sub-block size and threshold; `spec` one with `cuda_graph: true`
(`--spec-cuda-graph`), `draft_length` (`--draft-length`), `constrain_drafts: false`
(`--unconstrained-drafts`) or `forward_cost` (`--forward-cost`); `ar` serves
the same weights autoregressively.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from fast_dvlm_sglang.sglang_plugin.limits import ServingLimits

ALGORITHMS = ("ar", "mdm", "spec")
DEFAULT_DLLM_MAX_RUNNING = 16
DEFAULT_ALGORITHM = "spec"  # FastDVLMSpeculative: greedy answers equal AR, fewer forwards
DEMO_CHECKPOINT = Path(__file__).resolve().parent / "demo" / "checkpoint"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fast-dvlm serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo", help="'demo', a checkpoint directory, or a Hugging Face id")
    p.add_argument("--algorithm", choices=ALGORITHMS, default=DEFAULT_ALGORITHM)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-running-requests", type=int, default=None,
                   help=f"batch size (default: {DEFAULT_DLLM_MAX_RUNNING} for mdm/spec, SGLang's default for ar)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--sub-block-size", type=int, default=8, help="MDM sub-block size")
    p.add_argument("--threshold", type=float, default=0.9, help="MDM confidence threshold")
    p.add_argument("--mdm-full-blocks", action="store_true",
                   help="MDM: denoise every block to its end, also past a stop or max_tokens (the paper's NFE "
                        "convention; default: stop once the block's filled prefix ends the answer)")
    p.add_argument("--spec-cuda-graph", action="store_true",
                   help="spec on CUDA: capture the draft and verify passes as two decode CUDA graphs "
                        "(opt-in, not yet run on a GPU with SGLang; default: eager rounds)")
    p.add_argument("--draft-length", type=int, default=None,
                   help="spec: pin every round to this many draft tokens (0: AR steps; default: the adaptive "
                        "policy chooses per request and round)")
    p.add_argument("--unconstrained-drafts", action="store_true",
                   help="spec with a grammar (json_schema, regex, ...): draft the plain argmax instead of the "
                        "best grammatical candidate (README: Structured outputs; for measurements)")
    p.add_argument("--forward-cost", default=None,
                   help="spec: the adaptive policy's cost table (JSON from benchmarks/bench_forward_cost.py; "
                        "default: the built-in table of the device type)")
    limits = p.add_argument_group("security and limits (README: Security and limits)")
    limits.add_argument("--max-request-bytes", type=int, default=ServingLimits.max_request_bytes,
                        help="largest request body, counted before parsing; bigger gets HTTP 413 (0: no limit; "
                             "default: %(default)s = 32 MiB)")
    limits.add_argument("--request-read-timeout", type=float, default=ServingLimits.request_read_timeout_s,
                        help="seconds a request body may take to arrive; slower gets HTTP 408 (default: %(default)s)")
    limits.add_argument("--max-images", type=int, default=ServingLimits.max_images,
                        help="images per request (0: no limit; default: %(default)s)")
    limits.add_argument("--max-image-pixels", type=int, default=ServingLimits.max_image_pixels,
                        help="pixels per decoded image, read from its header (0: no limit; default: %(default)s)")
    limits.add_argument("--max-request-pixels", type=int, default=ServingLimits.max_request_pixels,
                        help="pixels of all images of a request together (0: no limit; default: %(default)s)")
    video = p.add_argument_group("video input (README: Video input)")
    video.add_argument("--max-videos", type=int, default=ServingLimits.max_videos,
                       help="video clips per request (0: no limit; default: %(default)s)")
    video.add_argument("--video-fps", type=float, default=ServingLimits.video_fps,
                       help="frames sampled per second of video (default: %(default)s, Qwen2.5-VL's)")
    video.add_argument("--max-video-frames", type=int, default=ServingLimits.max_video_frames,
                       help="frames kept per clip; a longer clip is sampled more sparsely (default: %(default)s)")
    video.add_argument("--max-video-pixels", type=int, default=ServingLimits.max_video_pixels,
                       help="pixels of all resized frames of a request (video tokens = this / 1568); over it "
                            "frames are made smaller, then fewer (default: %(default)s = 8192 tokens)")
    video.add_argument("--max-video-seconds", type=float, default=ServingLimits.max_video_seconds,
                       help="longest clip accepted, read from its header (0: no limit; default: %(default)s)")
    limits.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                        help="read local media files (absolute paths or file:// URLs) inside DIR only "
                             "(default: no local files)")
    limits.add_argument("--allow-image-urls", action="store_true",
                        help="fetch http(s) media URLs whose addresses are all public (default: data: URLs only)")
    limits.add_argument("--allowed-image-hosts", default=None, metavar="HOST[,HOST...]",
                        help="with --allow-image-urls: fetch from these hosts only (any address, loopback "
                             "included; SGLang's --allowed-media-domains)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--attention-backend", default=None, metavar="NAME",
                   help="SGLang attention backend (default: torch_native on CPU; on CUDA flashinfer for mdm, "
                        "triton for spec, SGLang's choice for ar). fast_dvlm_triton: our block-diffusion "
                        "kernel (kernels/block_attention.py; on CPU through Triton's interpreter)")
    p.add_argument("--dry-run", action="store_true", help="print the SGLang command and exit")
    return p


def resolve_model(model: str) -> str:
    if model == "demo":
        if not (DEMO_CHECKPOINT / "config.json").is_file():
            raise SystemExit(f"fast-dvlm serve: the demo checkpoint is missing at {DEMO_CHECKPOINT}")
        return str(DEMO_CHECKPOINT)
    return model


def _has_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def cpu_flags(attention_backend: str | None = None) -> list[str]:
    # --sleep-on-idle: an idle SGLang scheduler otherwise busy-polls a core, which on a CPU host
    # is a core taken from the model (it still wakes at once on a request: zmq poll).
    return ["--device", "cpu", "--attention-backend", attention_backend or "torch_native", "--sampling-backend", "pytorch",
            "--dtype", "float32", "--disable-cuda-graph", "--mm-attention-backend", "sdpa",
            "--max-total-tokens", "8192", "--skip-server-warmup", "--tp-size", "1", "--sleep-on-idle"]


# On CUDA, the attention backend each dLLM algorithm is served with (what SGLang's own dLLM
# resolution picks from the algorithm's `required_attention_backend`; written out so the command
# line says it): spec's two-capture graphs need triton (`speculative.GRAPH_BACKEND`), MDM runs on
# flashinfer, SGLang's dLLM graph backend. `ar` keeps SGLang's default (fa3 on Hopper).
CUDA_ATTENTION_BACKEND = {"mdm": "flashinfer", "spec": "triton"}


def _given(extra: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in extra)


def cuda_flags(algorithm: str, extra: list[str], attention_backend: str | None = None) -> list[str]:
    """Device flags on CUDA, unless the raw SGLang args after `--` set them."""
    flags = []
    if not _given(extra, "--dtype"):
        # `--dtype auto` serves a float32 checkpoint (the demo) in float16; the model is bf16.
        flags += ["--dtype", "bfloat16"]
    backend = attention_backend or CUDA_ATTENTION_BACKEND.get(algorithm)
    if backend and not _given(extra, "--attention-backend"):
        flags += ["--attention-backend", backend]
    return flags


def build_command(args: argparse.Namespace, extra: list[str], algo_config: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", resolve_model(args.model),
           "--host", args.host, "--port", str(args.port)]
    served_name = args.served_model_name or ("demo" if args.model == "demo" else None)
    if served_name:  # OpenAI `model` field; SGLang's default is the model path
        cmd += ["--served-model-name", served_name]
    max_running = args.max_running_requests
    if max_running is None and args.algorithm != "ar":
        # SGLang's DllmConfig defaults to one request at a time; our algorithms are batched.
        max_running = DEFAULT_DLLM_MAX_RUNNING
    if max_running is not None:
        cmd += ["--max-running-requests", str(max_running)]
    if args.api_key:
        cmd += ["--api-key", args.api_key]
    device = _device(args)
    if device == "cpu":
        cmd += cpu_flags(args.attention_backend)
    else:
        cmd += cuda_flags(args.algorithm, extra, args.attention_backend)
    if args.algorithm == "mdm":
        cmd += ["--dllm-algorithm", "FastDVLMBlock"]
        if algo_config:
            cmd += ["--dllm-algorithm-config", algo_config]
    elif args.algorithm == "spec":
        cmd += ["--dllm-algorithm", "FastDVLMSpeculative"]
        if algo_config:
            cmd += ["--dllm-algorithm-config", algo_config]
    if args.allowed_image_hosts:
        cmd += ["--allowed-media-domains", *[h.strip() for h in args.allowed_image_hosts.split(",") if h.strip()]]
    return cmd + extra


def _device(args: argparse.Namespace) -> str:
    return args.device if args.device != "auto" else ("cuda" if _has_cuda() else "cpu")


def last_value(cmd: list[str], flag: str) -> str | None:
    """The value SGLang's argument parser keeps for `flag` (the last one given)."""
    value = None
    for i, a in enumerate(cmd):
        if a == flag and i + 1 < len(cmd):
            value = cmd[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


PARALLEL_FLAGS = {"tp": ("--tp", "--tp-size", "--tensor-parallel-size"),
                  "dp": ("--dp", "--dp-size", "--data-parallel-size"),
                  "pp": ("--pp-size", "--pipeline-parallel-size")}


def cpu_ranks(cmd: list[str]) -> int:
    """SGLang processes that each run a model replica or shard: dp x tp x pp."""
    ranks = 1
    for flags in PARALLEL_FLAGS.values():
        value = None
        for i, a in enumerate(cmd):  # the last of any alias wins, as in SGLang's parser
            if a in flags and i + 1 < len(cmd):
                value = cmd[i + 1]
            elif a.split("=", 1)[0] in flags and "=" in a:
                value = a.split("=", 1)[1]
        try:
            ranks *= max(int(value), 1) if value is not None else 1
        except ValueError:
            pass  # SGLang's own parser reports it
    return ranks


def cpu_thread_binding(ranks: int, cores: list[int]) -> str:
    """SGLang's `SGLANG_CPU_OMP_THREADS_BIND` for `ranks` ranks on `cores`: contiguous, equal
    groups (SGLang's CPU default is one rank per NUMA node and refuses more ranks than nodes)."""
    if ranks > len(cores):
        raise SystemExit(f"fast-dvlm serve: {ranks} ranks (dp x tp x pp) on CPU need at least {ranks} cores, "
                         f"this machine has {len(cores)}")
    per = len(cores) // ranks
    groups = [cores[i * per:(i + 1) * per] for i in range(ranks)]
    return "|".join(",".join(str(c) for c in g) for g in groups)


def backend_env(cmd: list[str]) -> dict[str, str]:
    """Environment the SGLang processes need: our Triton kernel on a CPU runs in Triton's
    interpreter, which must be on before SGLang first imports Triton; several CPU ranks (`-- --dp
    2`, `-- --tp 2`) get their cores split between them unless `SGLANG_CPU_OMP_THREADS_BIND` is set.

    On every device SGLang's model registry scans our models package only
    (`SGLANG_EXTERNAL_MODEL_PACKAGE`, SGLang's switch for that): at startup each scheduler process
    otherwise imports all 283 of SGLang 0.5.23's model modules to find ours, ~2.5 s of CPU per rank
    (`python -X importtime`). An architecture that is not ours still resolves: SGLang's registry
    then loads its own models (`ModelRegistry.resolve_model_cls`)."""
    from fast_dvlm_sglang.sglang_plugin import MODELS_PACKAGE

    env = {}
    if not os.environ.get("SGLANG_EXTERNAL_MODEL_PACKAGE"):
        env["SGLANG_EXTERNAL_MODEL_PACKAGE"] = MODELS_PACKAGE
    if last_value(cmd, "--device") != "cpu":
        return env
    if last_value(cmd, "--attention-backend") == "fast_dvlm_triton":
        env["TRITON_INTERPRET"] = "1"
    ranks = cpu_ranks(cmd)
    if ranks > 1 and not os.environ.get("SGLANG_CPU_OMP_THREADS_BIND"):
        env["SGLANG_CPU_OMP_THREADS_BIND"] = cpu_thread_binding(ranks, sorted(os.sched_getaffinity(0)))
    return env


def serving_limits(args: argparse.Namespace) -> ServingLimits:
    """The request limits and media policy (`sglang_plugin/limits.py`), checked; one-line errors."""
    if args.allowed_image_hosts and not args.allow_image_urls:
        raise SystemExit("fast-dvlm serve: --allowed-image-hosts needs --allow-image-urls")
    try:
        return ServingLimits(max_request_bytes=args.max_request_bytes, max_images=args.max_images,
                             max_image_pixels=args.max_image_pixels, max_request_pixels=args.max_request_pixels,
                             request_read_timeout_s=args.request_read_timeout,
                             allowed_local_media_path=args.allowed_local_media_path,
                             allow_media_urls=args.allow_image_urls, max_videos=args.max_videos,
                             video_fps=args.video_fps, max_video_frames=args.max_video_frames,
                             max_video_pixels=args.max_video_pixels,
                             max_video_seconds=args.max_video_seconds).checked()
    except ValueError as e:
        raise SystemExit(f"fast-dvlm serve: {e}") from None


def check_video_support(args: argparse.Namespace, limits: ServingLimits) -> None:
    """Clips are decoded with PyAV (its wheels carry FFmpeg): missing, the server would answer
    every clip with an error, so it does not start. The caps must fit the checkpoint's frame size."""
    try:
        import av  # noqa: F401
    except ImportError:
        raise SystemExit("fast-dvlm serve: video decoding needs PyAV: pip install av "
                         "(a dependency of fast-dvlm-sglang; reinstall the package)") from None
    from fast_dvlm_sglang.video import video_frame_bounds

    model_dir = Path(resolve_model(args.model))
    if not model_dir.is_dir():
        return  # a hub id: SGLang resolves it; the caps are checked per request against its bounds
    try:
        limits.video_policy(video_frame_bounds(model_dir))
    except (OSError, ValueError) as e:
        raise SystemExit(f"fast-dvlm serve: {e} (--max-video-pixels)") from None


def algorithm_yaml(args: argparse.Namespace) -> str | None:
    """The `--dllm-algorithm-config` YAML for the chosen algorithm (None: none needed)."""
    spec_only = {"--spec-cuda-graph": args.spec_cuda_graph, "--draft-length": args.draft_length is not None,
                 "--forward-cost": args.forward_cost is not None, "--unconstrained-drafts": args.unconstrained_drafts}
    for flag, given in spec_only.items():
        if given and args.algorithm != "spec":
            raise SystemExit(f"fast-dvlm serve: {flag} needs --algorithm spec")
    if args.mdm_full_blocks and args.algorithm != "mdm":
        raise SystemExit("fast-dvlm serve: --mdm-full-blocks needs --algorithm mdm")
    if args.algorithm == "mdm":
        return (f"sub_block_size: {args.sub_block_size}\nthreshold: {args.threshold}\n"
                + ("stop_early: false\n" if args.mdm_full_blocks else ""))
    lines = []
    if args.spec_cuda_graph:
        if args.device == "cpu" or (args.device == "auto" and not _has_cuda()):
            raise SystemExit("fast-dvlm serve: --spec-cuda-graph needs a CUDA GPU")
        lines.append("cuda_graph: true")
    if args.draft_length is not None:
        if args.draft_length < 0:
            raise SystemExit(f"fast-dvlm serve: --draft-length must be >= 0, got {args.draft_length}")
        lines.append(f"draft_length: {args.draft_length}")
    if args.unconstrained_drafts:
        lines.append("constrain_drafts: false")
    if args.forward_cost is not None:
        path = Path(args.forward_cost).resolve()
        if not path.is_file():
            raise SystemExit(f"fast-dvlm serve: --forward-cost {args.forward_cost}: no such file")
        lines.append(f"forward_cost: {json.dumps(str(path))}")
    return "".join(line + "\n" for line in lines) or None


def serve_main(argv: list[str]) -> int:
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    args = _parser().parse_args(argv)
    algo_config, algo_yaml = None, algorithm_yaml(args)
    limits = serving_limits(args)
    check_video_support(args, limits)
    limits_env = limits.env()
    with tempfile.TemporaryDirectory(prefix="fast-dvlm-serve-") as tmp:
        if algo_yaml is not None:
            algo_config = os.path.join(tmp, f"fast_dvlm_{args.algorithm}.yaml")
            with open(algo_config, "w") as f:
                f.write(algo_yaml)
        cmd = build_command(args, extra, algo_config)
        limits_env.update(backend_env(cmd))
        if args.dry_run:
            print(" ".join([*(f"{k}={v}" for k, v in sorted(limits_env.items())), *cmd]))
            return 0
        env = dict(os.environ)
        env.pop("SGLANG_USE_CPU_ENGINE", None)
        env.update(limits_env)  # every SGLang process reads them (`sglang_plugin/limits.py`)
        proc = subprocess.Popen(cmd, env=env)
        # A process manager stops us with SIGTERM (or SIGHUP when the terminal goes): pass it on,
        # or the SGLang server outlives us and keeps the port and the memory.
        forward = lambda signum, _frame: proc.send_signal(signum)  # noqa: E731
        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGHUP)}
        try:
            return proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            return proc.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


if __name__ == "__main__":
    raise SystemExit(serve_main(sys.argv[1:]))
