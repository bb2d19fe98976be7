"""`fast-dvlm`: make-tiny, generate, eval-demo, quantize, serve, bench.

Errors the user can fix (bad paths, bad images, bad flags) print one line `error: ...` and exit
with status 2; nothing else is caught, so real bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .config import CheckpointError


class UsageError(Exception):
    pass


def _add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo", help="'demo' (bundled), a checkpoint directory, or a cached HF id")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fast-dvlm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-tiny", help="write a tiny random checkpoint in the Fast_dVLM_3B format")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", choices=["new", "old"], default="new", help="checkpoint key layout")

    p = sub.add_parser("generate", help="answer one prompt with the PyTorch reference decoders")
    _add_model_arg(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--image", type=Path, action="append", default=[], help="image file (repeatable)")
    p.add_argument("--video", type=Path, action="append", default=[],
                   help="video clip (repeatable; mp4, webm, mkv, ... decoded with PyAV); after the images")
    p.add_argument("--video-fps", type=float, default=2.0, help="frames sampled per second of video")
    p.add_argument("--max-video-frames", type=int, default=32, help="frames kept per clip at most")
    p.add_argument("--algorithm", choices=["ar", "mdm", "spec"], default="spec")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--threshold", type=float, default=0.9, help="MDM confidence threshold")
    p.add_argument("--block-size", type=int, default=None, help="default: the checkpoint's bd_size")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--raw", action="store_true", help="feed the prompt as is, without the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--device", default="cpu")

    p = sub.add_parser("eval-demo", help="accuracy and tokens/NFE on a fresh held-out shapes set")
    _add_model_arg(p)
    p.add_argument("--algorithm", choices=["ar", "mdm", "spec"], default="spec")
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", action="store_true")

    sub.add_parser("quantize", help="SmoothQuant + W8A8 FP8 to a compressed-tensors checkpoint "
                                    "(arguments: fast-dvlm quantize --help)", add_help=False)
    sub.add_parser("serve", help="serve through SGLang's OpenAI server (arguments: fast-dvlm serve --help)",
                   add_help=False)
    sub.add_parser("bench", help="serving and forward benchmarks (arguments: fast-dvlm bench --help)",
                   add_help=False)
    return parser


def cmd_make_tiny(args) -> int:
    from .tiny import make_tiny_checkpoint

    out = make_tiny_checkpoint(args.out, seed=args.seed, layout=args.layout)
    print(out)
    return 0


def cmd_generate(args) -> int:
    import torch

    from .config import resolve_model_dir
    from .decoding import GenerationConfig, Prompt, SamplingParams, generate
    from .model import FastDVLMForConditionalGeneration
    from .processing import encode_chat, video_policy
    from .tokenizer import load_processor

    model_dir = resolve_model_dir(args.model)
    for flag, paths in (("--image", args.image), ("--video", args.video)):
        for path in paths:
            if not path.is_file():
                raise UsageError(f"{flag} {path}: no such file")
    try:
        sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
        gen_cfg = GenerationConfig(args.algorithm, max_new_tokens=args.max_new_tokens, block_size=args.block_size,
                                   threshold=args.threshold, sampling=sampling, stop_strings=tuple(args.stop))
    except ValueError as e:
        raise UsageError(str(e)) from e
    processor = load_processor(model_dir)
    if args.raw:
        if args.image or args.video:
            raise UsageError("--raw cannot be combined with --image/--video (they need the chat template)")
        prompt = Prompt(processor.tokenizer.encode(args.prompt, add_special_tokens=False))
    else:
        content = ([{"type": "image", "image": str(p)} for p in args.image]
                   + [{"type": "video", "video": str(p)} for p in args.video]
                   + [{"type": "text", "text": args.prompt}])
        try:
            policy = video_policy(processor, fps=args.video_fps, max_frames=args.max_video_frames)
            enc = encode_chat(processor, [{"role": "user", "content": content}], video_policy=policy)
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read the prompt/image/video: {e}") from e
        prompt = Prompt.from_encoded(enc)
    if not prompt.input_ids:
        raise UsageError("the prompt is empty")
    model = FastDVLMForConditionalGeneration.from_pretrained(model_dir, device=args.device)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    result = generate(model, prompt, gen_cfg, tokenizer=processor.tokenizer)
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps({"algorithm": result.algorithm, "text": result.text, "token_ids": result.token_ids,
                          "nfe": result.nfe, "tokens_per_nfe": round(result.tokens_per_nfe, 4)}))
    else:
        print(result.text)
        print(f"[{result.algorithm}: {len(result.token_ids)} tokens, {result.nfe} NFE, "
              f"{result.tokens_per_nfe:.2f} tokens/NFE, {seconds:.2f} s, finish={result.finish_reason}]",
              file=sys.stderr)
    return 0


def cmd_eval_demo(args) -> int:
    from .demo.evaluate import evaluate
    from .demo.train import TRAIN_SEED

    if args.n < 1:
        raise UsageError("--n must be >= 1")
    if not 0.0 <= args.threshold <= 1.0:
        raise UsageError(f"--threshold must be in [0, 1], got {args.threshold}")
    if args.seed == TRAIN_SEED:
        raise UsageError(f"--seed {TRAIN_SEED} is the training split; pick another seed")
    report = evaluate(args.model, args.algorithm, threshold=args.threshold, n=args.n, seed=args.seed,
                      progress=not args.json)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{report['algorithm']}: accuracy {report['accuracy']:.3f} on n={report['n']} (seed {args.seed}), "
              f"{report['tokens_per_nfe']:.2f} tokens/NFE ({report['nfe']} NFE), "
              f"{report['avg_answer_tokens']:.1f} tokens/answer, {report['seconds']:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        from .serve import serve_main

        return serve_main(argv[1:])
    if argv and argv[0] == "bench":
        from .benchmarks.cli import bench_main

        return bench_main(argv[1:])
    if argv and argv[0] == "quantize":
        from .quantize.export import quantize_main

        return quantize_main(argv[1:])
    args = build_parser().parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()  # config-class chatter from AutoTokenizer on fast_dvlm
    handlers = {"make-tiny": cmd_make_tiny, "generate": cmd_generate, "eval-demo": cmd_eval_demo}
    try:
        return handlers[args.command](args)
    except (UsageError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
