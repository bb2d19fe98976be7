"""`fast-dvlm bench serve | online | forward | cost-table`: argument parsing and errors (one line, exit 2).

    fast-dvlm bench serve --model demo --algorithms ar,mdm,spec --concurrency 1,4,16
    fast-dvlm bench online --base-url http://127.0.0.1:8000 --concurrency 1,4,16 --requests 32
    fast-dvlm bench forward --config fast-dvlm-3b --random-weights --precisions bf16,fp8
    fast-dvlm bench cost-table --config fast-dvlm-3b --random-weights     # the draft policy's cost table

`make bench` runs the CPU suite on the demo model; `benchmarks/gpu.sh` the forward benchmark on a
GPU machine (PyTorch + Triton, no SGLang needed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


class BenchUsageError(Exception):
    pass


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (`<prog>: error: ...`, exit 2), not usage + error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _list(kind, choices=None):
    def parse(text: str):
        items = [x.strip() for x in text.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError("an empty list")
        if kind is int:
            try:
                values = [int(x) for x in items]
            except ValueError:
                raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
            if any(v < 1 for v in values):
                raise argparse.ArgumentTypeError(f"{text!r}: every value must be >= 1")
            return values
        bad = [x for x in items if choices and x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"{', '.join(bad)} not in {', '.join(choices)}")
        return list(dict.fromkeys(items))
    return parse


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--concurrency", type=_list(int), default=[1, 4, 16], help="comma-separated (default 1,4,16)")
    p.add_argument("--requests", type=_positive, default=32, help="requests per concurrency level")
    p.add_argument("--max-new-tokens", type=_positive, default=128)
    p.add_argument("--dataset", default="demo", help="'demo' (held-out demo prompts with images) or a JSONL file")
    p.add_argument("--request-timeout", type=float, default=900.0)
    p.add_argument("--out", type=Path, default=None, help="report JSON (.md and .png are written next to it)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _path_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--attention", choices=("triton", "sdpa"), default="triton",
                   help="CUDA: our Triton kernel or SDPA with a mask (CPU: always SDPA)")
    p.add_argument("--fp8-gemm", choices=("triton", "scaled_mm"), default="triton",
                   help="CUDA fp8: our Triton GEMM or torch._scaled_mm")


def build_parser() -> argparse.ArgumentParser:
    from .suite import ALGORITHMS, PRECISIONS

    parser = OneLineParser(prog="fast-dvlm bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="kind", required=True, parser_class=OneLineParser,
                                metavar="{serve,online,forward,cost-table}")

    p = sub.add_parser("serve", help="start our SGLang server per configuration and benchmark it")
    p.add_argument("--model", default="demo", help="'demo' or a checkpoint directory")
    p.add_argument("--algorithms", type=_list(str, ALGORITHMS), default=["ar", "mdm", "spec"],
                   help=f"comma-separated from {', '.join(ALGORITHMS)} (mdm-full: whole blocks, the paper's NFE)")
    p.add_argument("--precisions", type=_list(str, PRECISIONS), default=["bf16"])
    p.add_argument("--fp8-model", default=None, help="the FP8 checkpoint (default: quantize --model on the fly)")
    p.add_argument("--device", default=None, help="fast-dvlm serve --device (default: auto)")
    p.add_argument("--startup-timeout", type=float, default=900.0)
    _load_args(p)

    p = sub.add_parser("online", help="benchmark an OpenAI-compatible server that is already running")
    p.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000 (with or without /v1)")
    p.add_argument("--model", dest="model_name", default=None, help="served model name (default: the first listed)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--algorithm", default="server", help="label for the rows (ar / mdm / spec, or any name)")
    p.add_argument("--precision", default="bf16", help="label for the rows")
    p.add_argument("--device-label", default=None, help="the server's device, for the report")
    _load_args(p)

    p = sub.add_parser("forward", help="model-level forward timings of the PyTorch reference (GPU: CUDA graphs)")
    p.add_argument("--config", choices=["fast-dvlm-3b", "tiny"], default="fast-dvlm-3b")
    p.add_argument("--random-weights", action="store_true", required=True,
                   help="random weights of --config's shapes (nothing is downloaded)")
    p.add_argument("--precisions", type=_list(str, PRECISIONS), default=["bf16"])
    p.add_argument("--contexts", type=_list(int), default=[512, 2048, 8192])
    p.add_argument("--batch-sizes", type=_list(int), default=[1, 4, 16])
    p.add_argument("--block-size", type=_positive, default=32)
    p.add_argument("--reps", type=_positive, default=20, help="timed replays per forward (median)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--no-graphs", action="store_true", help="eager forwards even on CUDA")
    _path_args(p)
    p.add_argument("--baseline-new-tokens", type=int, default=64,
                   help="transformers eager generate: tokens per timed run (0: skip the baseline)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("cost-table", help="the draft policy's forward cost table, timed on the model (GPU: CUDA graphs)")
    p.add_argument("--config", choices=["fast-dvlm-3b", "tiny"], default="fast-dvlm-3b")
    p.add_argument("--random-weights", action="store_true",
                   help="random weights of --config's shapes (required unless --refit)")
    p.add_argument("--precision", choices=PRECISIONS, default="bf16")
    p.add_argument("--contexts", type=_list(int), default=[512, 4096])
    p.add_argument("--batch-sizes", type=_list(int), default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--widths", type=_list(int), default=[1, 2, 4, 8, 16, 32],
                   help="tokens per row of a forward (1: an AR step; w > 1: a draft and a verify)")
    p.add_argument("--reps", type=_positive, default=20, help="timed replays per forward (median)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--no-graphs", action="store_true", help="eager forwards even on CUDA")
    _path_args(p)
    p.add_argument("--refit", type=Path, default=None, help="recompute the fit and the implied draft lengths of a report")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--quiet", action="store_true")
    return parser


def _requests(args):
    from .load import DatasetError, demo_requests, jsonl_requests

    if args.dataset == "demo":
        args.dataset_label = "demo"
        return demo_requests(args.requests, args.max_new_tokens)
    try:
        reqs = jsonl_requests(Path(args.dataset), args.requests, args.max_new_tokens)
    except DatasetError as e:
        raise BenchUsageError(str(e)) from None
    args.dataset_label = str(args.dataset)
    return reqs


def bench_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(argv)
    try:
        return _run(args)
    except BenchUsageError as e:
        print(f"fast-dvlm bench {args.kind}: error: {e}", file=sys.stderr)
        return 2


def _cost_table(args) -> int:
    import json

    from .cost_table import cost_table_bench, cost_table_markdown, refit, write_cost_table

    if args.refit is not None:
        try:
            report = refit(json.loads(args.refit.read_text()))
        except (OSError, ValueError, KeyError) as e:
            raise BenchUsageError(f"--refit {args.refit}: not a cost-table report ({e})") from None
        out = args.out or args.refit
    else:
        if not args.random_weights:
            raise BenchUsageError("--random-weights is required (the table is timed on random weights)")
        report = cost_table_bench(args)
        device = report["settings"]["device_type"]
        out = args.out or Path(__file__).parent / "results" / f"forward_cost_{device}_{args.config}.json"
    paths = write_cost_table(report, out)
    print(cost_table_markdown(report))
    for path in paths:
        print(path)
    return 0


def _run(args) -> int:
    from .suite import default_out, online_bench, serve_bench, write_report

    if args.kind == "cost-table":
        return _cost_table(args)
    if args.kind == "forward":
        from .forward import forward_bench

        report = forward_bench(args)
        out = args.out or default_out("forward", args.config)
    else:
        if args.kind == "serve" and args.model != "demo" and not Path(args.model).is_dir():
            raise BenchUsageError(f"--model {args.model}: not 'demo' and no such checkpoint directory")
        if args.kind == "serve" and args.fp8_model and not Path(args.fp8_model).is_dir():
            raise BenchUsageError(f"--fp8-model {args.fp8_model}: no such checkpoint directory")
        requests = _requests(args)
        report = serve_bench(args, requests) if args.kind == "serve" else online_bench(args, requests)
        out = args.out or default_out(args.kind, args.model if args.kind == "serve" else "online")
    paths = write_report(report, out, plot=not args.no_plots if hasattr(args, "no_plots") else True)
    from .serving_metrics import markdown_table

    if args.kind != "forward":
        print(markdown_table(report["summary"]))
    for path in paths:
        print(path)
    return 0
