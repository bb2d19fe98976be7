"""`fast-dvlm quantize`: SmoothQuant + W8A8 FP8 through llmcompressor, to a compressed-tensors checkpoint.

    fast-dvlm quantize --model SRC --out DST [--scheme w8a8-fp8] [--smoothquant-alpha 0.5]
        [--calib-data demo|PATH] [--calib-samples N] [--calib-modes causal[,draft]] [--max-seq-len L]
        [--force] [--json]

1. load SRC (`demo`, a directory in either key layout, or a cached HF id) in float32;
2. run llmcompressor's `oneshot` on calibration forwards (`calibration.py`: causal by default) with the recipe of `recipe.py`;
3. compress (compressed-tensors' `ModelCompressor`: float8 weights, float32 per-channel scales);
4. write DST atomically (a temp dir beside it, then one rename): weights, config.json with
   `quantization_config`, the tokenizer, chat template, processor and generation config, and
   `quantization_report.json` (`report.py`).

llmcompressor drives a transformers model; ours is a plain nn.Module, so `_OneshotModel` gives it
what `oneshot` reads (a `config.name_or_path`, a `save_pretrained` to wrap, a forward taking
`input_ids` / `pixel_values` / `image_grid_thw` / `attention_mask`) and `pipeline="basic"` runs
the calibration forwards whole (the sequential pipeline needs a decoder-layer forward we do not
have, and SmoothQuant collects its statistics with quantization off anyway).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from fast_dvlm_sglang.checkpoint import WEIGHTS_NAME, save_checkpoint
from fast_dvlm_sglang.config import CheckpointError, FastDVLMConfig, resolve_model_dir
from fast_dvlm_sglang.model import FastDVLMForConditionalGeneration

from . import calibration, report
from .scheme import SCHEMES, quantization_config

# Files of the source checkpoint that are not carried over (weights are rewritten, the rest is the
# tokenizer, chat template, processor and generation config).
NOT_CARRIED = {"config.json", WEIGHTS_NAME, "model.safetensors.index.json", "quantization_report.json"}
_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def _carried(path: Path) -> bool:
    return path.is_file() and path.name not in NOT_CARRIED and path.suffix != ".safetensors"


def source_dtype(model_dir) -> torch.dtype:
    """The precision of the source's weights (what everything FP8 does not quantize keeps)."""
    from safetensors import safe_open

    from fast_dvlm_sglang.checkpoint import weight_files

    for file in weight_files(model_dir):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                if "embed_tokens" in key:
                    return _SAFETENSORS_DTYPES.get(f.get_slice(key).get_dtype(), torch.float32)
    return torch.float32


def _in_source_precision(state: dict, dtype: torch.dtype) -> dict:
    """Calibration ran in float32; what is not float8 (and not a scale) goes back to `dtype`."""
    return {k: v if v.dtype == torch.float8_e4m3fn or k.endswith("_scale") or not v.is_floating_point()
            else v.to(dtype) for k, v in state.items()}


class QuantizeError(ValueError):
    pass


def _register_config_type() -> None:
    """`oneshot` reads `AutoConfig.from_pretrained(model.config.name_or_path)`; transformers does not
    know `model_type: fast_dvlm` unless told."""
    from fast_dvlm_sglang.sglang_plugin.hf_config import register_config

    register_config()


class _OneshotModel(FastDVLMForConditionalGeneration):
    """The reference model as `oneshot` calls it (same modules, same names)."""

    def forward(self, input_ids=None, pixel_values=None, image_grid_thw=None, attention_mask=None, **kw):
        if input_ids is None:
            return super().forward(attention_mask=attention_mask, **kw)
        h = self.embed(input_ids, pixel_values, image_grid_thw)
        positions = self.rope_positions(input_ids, image_grid_thw)
        return super().forward(h, positions, attention_mask)

    def get_input_embeddings(self):  # oneshot checks that no embedding is quantized
        return self.model.language_model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def save_pretrained(self, *args, **kwargs):  # oneshot wraps it; we save with ModelCompressor
        raise NotImplementedError("save a quantized Fast-dVLM with fast_dvlm_sglang.quantize.export")


def _quantization_config_json(compressor, raw_config: dict) -> dict:
    """config.json with the `quantization_config` compressed-tensors writes itself."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(raw_config))
        compressor.update_config(tmp)
        return json.loads((Path(tmp) / "config.json").read_text())


def calibrate(net: FastDVLMForConditionalGeneration, model_dir, processor, calib: list[dict], alpha: float,
              *, quantize: bool = True) -> FastDVLMForConditionalGeneration:
    """llmcompressor's `oneshot` on `net` in place: SmoothQuant (alpha), then W8A8 FP8 fake
    quantization (`quantize=False`: smoothing only, an identity of the model's function)."""
    from llmcompressor import oneshot
    from llmcompressor.core import reset_session

    from .recipe import recipe

    _register_config_type()
    net.__class__ = _OneshotModel
    object.__setattr__(net.config, "name_or_path", str(model_dir))  # FastDVLMConfig is frozen
    try:
        reset_session()
        batches = [{k: v for k, v in s.items() if k != "mode"} for s in calib]  # tensors only
        loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
        oneshot(model=net, processor=processor, dataset=loader, recipe=recipe(net.config.text, alpha, quantize=quantize),
                pipeline="basic")
    finally:
        net.__class__ = FastDVLMForConditionalGeneration
    return net


def check_args(args) -> Path:
    if args.scheme not in SCHEMES:
        raise QuantizeError(f"unknown scheme {args.scheme!r} (supported: {', '.join(SCHEMES)})")
    if not 0.0 <= args.smoothquant_alpha <= 1.0:
        raise QuantizeError(f"--smoothquant-alpha must be in [0, 1], got {args.smoothquant_alpha}")
    if args.calib_samples < 1:
        raise QuantizeError(f"--calib-samples must be >= 1, got {args.calib_samples}")
    if args.max_seq_len < 16:
        raise QuantizeError(f"--max-seq-len must be >= 16, got {args.max_seq_len}")
    modes = tuple(m for m in args.calib_modes.split(",") if m)
    if not modes or set(modes) - set(calibration.MODES):
        raise QuantizeError(f"--calib-modes must be a subset of {','.join(calibration.MODES)}, got {args.calib_modes!r}")
    out = Path(args.out).expanduser()
    if out.exists() and not args.force:
        raise QuantizeError(f"{out} exists; pass --force to replace it")
    return out


def quantize(model: str, out: str | Path, *, scheme: str = "w8a8-fp8", alpha: float = 0.5, calib_data: str = "demo",
             calib_samples: int = 64, calib_modes=calibration.DEFAULT_MODES, max_seq_len: int = 2048,
             held_out: int = 8, progress: bool = True) -> dict:
    """Quantize `model` into `out` (replaced atomically); returns the report."""
    from compressed_tensors import ModelCompressor

    from fast_dvlm_sglang.tokenizer import load_processor

    start = time.perf_counter()
    model_dir = resolve_model_dir(model)
    cfg = FastDVLMConfig.from_dir(model_dir)
    if quantization_config(cfg.raw) is not None:
        raise QuantizeError(f"{model_dir} is already quantized")
    processor = load_processor(model_dir)
    calib = calibration.samples(processor, cfg, calib_data, calib_samples, modes=calib_modes, max_seq_len=max_seq_len)
    held = calibration.samples(processor, cfg, "demo" if calib_data == "demo" else calib_data, held_out,
                               modes=calibration.MODES, max_seq_len=max_seq_len, seed=calibration.HELD_OUT_SEED)
    if calib_data != "demo":  # a file has no seeds: hold out its last records instead
        held = held[-2 * held_out:]

    net = FastDVLMForConditionalGeneration.from_pretrained(model_dir)
    source_logits = report.logits(net, held)
    t0 = time.perf_counter()
    calibrate(net, model_dir, processor, calib, alpha)
    calibrate_s = time.perf_counter() - t0

    weight_errors = report.weight_errors(net)
    compressor = ModelCompressor.from_pretrained_model(net)
    compressor.compress_model(net)
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("weight_zero_point")}
    config = _quantization_config_json(compressor, dict(cfg.raw))
    del net

    state = _in_source_precision(state, source_dtype(model_dir))
    fp8_model = report.model_from_state(config, model_dir, state)
    rep = report.build(source_logits, fp8_model, held, weight_errors, scheme=scheme, alpha=alpha,
                       calib_data=calib_data, calib_samples=len(calib), calib_modes=list(calib_modes),
                       calibrate_s=calibrate_s)
    rep["seconds"] = round(time.perf_counter() - start, 1)
    rep["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    extra = {p.name: p.read_bytes() for p in Path(model_dir).iterdir() if _carried(p)}
    extra["quantization_report.json"] = json.dumps(rep, indent=2) + "\n"
    save_checkpoint(state, config, out, extra_files=extra)
    return rep


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fast-dvlm quantize", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo", help="'demo', a checkpoint directory, or a cached HF id")
    p.add_argument("--out", required=True, help="the quantized checkpoint directory (written atomically)")
    p.add_argument("--scheme", default="w8a8-fp8", help=f"one of {', '.join(SCHEMES)}")
    p.add_argument("--smoothquant-alpha", type=float, default=0.5, help="SmoothQuant strength in [0, 1]")
    p.add_argument("--calib-data", default="demo", help="'demo' or a JSONL file / directory of {image, prompt[, answer]}")
    p.add_argument("--calib-samples", type=int, default=64, help="calibration records (each gives one forward per mode)")
    p.add_argument("--calib-modes", default=",".join(calibration.DEFAULT_MODES),
                   help="attention modes calibrated: causal (prefill/verify) and/or draft (block-bidirectional); "
                        "default causal (measured: see calibration.py)")
    p.add_argument("--max-seq-len", type=int, default=2048, help="longest calibration forward, in tokens")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def quantize_main(argv: list[str]) -> int:
    import os

    import transformers

    args = _parser().parse_args(argv)
    # llmcompressor logs every smoothing step at INFO and advises (WARNING) a GPU and its
    # sequential pipeline, which do not apply here; transformers warns about our config class.
    # Keep the console to our own lines and errors (LLM_COMPRESSOR_LOG_LEVEL set by a user wins).
    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "ERROR")
    transformers.logging.set_verbosity_error()
    try:
        out = check_args(args)
        rep = quantize(args.model, out, scheme=args.scheme, alpha=args.smoothquant_alpha, calib_data=args.calib_data,
                       calib_samples=args.calib_samples, calib_modes=tuple(m for m in args.calib_modes.split(",") if m),
                       max_seq_len=args.max_seq_len, progress=not args.json)
    except (QuantizeError, CheckpointError, calibration.CalibrationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rep))
    else:
        print(report.summary(rep, out))
    return 0

