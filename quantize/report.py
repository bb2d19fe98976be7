"""The quantization report (`DST/quantization_report.json`, printed by `fast-dvlm quantize`).

- per quantized layer: the weight's quantization error (max |W - deq(W_q)| / max |W| and the
  relative Frobenius error, W being the smoothed weight) and its scale range;
- per quantized layer: the activation scales seen on the held-out forwards (min / max over
  tokens of max|x| / 448);
- on held-out prompts, for causal and block-bidirectional (draft) forwards: top-1 agreement and
  mean KL(source || FP8) of the next-token distributions, FP8 vs the source model;
- the time taken and the peak memory (filled in by `export.py`).
"""

from __future__ import annotations

import torch

from fast_dvlm_sglang.config import FastDVLMConfig
from fast_dvlm_sglang.model import FastDVLMForConditionalGeneration

from .fp8 import FP8_MAX, FP8Linear, dequantize, quantize_per_channel


def _rows(sample: dict, logits: torch.Tensor) -> torch.Tensor:
    """The positions whose next-token distributions matter: every row of a causal forward, the
    block rows of a draft forward."""
    if sample.get("mode") == "draft":
        mask = sample["attention_mask"]
        first = int(mask.all(dim=1).nonzero()[0])  # the first row that sees everything: the block
        return logits[0, first:]
    return logits[0]


@torch.no_grad()
def logits(model: FastDVLMForConditionalGeneration, samples: list[dict]) -> list[torch.Tensor]:
    """Log-probabilities [rows, V] (float32) of each held-out sample."""
    out = []
    for s in samples:
        ids = s["input_ids"]
        h = model.embed(ids, s.get("pixel_values"), s.get("image_grid_thw"))
        z = model(h, model.rope_positions(ids, s.get("image_grid_thw")), s["attention_mask"])
        out.append(torch.log_softmax(_rows(s, z).float(), dim=-1))
    return out


@torch.no_grad()
def weight_errors(model: torch.nn.Module) -> dict[str, dict]:
    """For each linear llmcompressor quantizes (it carries a `quantization_scheme`), the error of
    our per-channel float8 quantization of its (smoothed) weight: the same values compressed-tensors
    writes (`fp8.quantize_per_channel`, checked bit-for-bit in the tests)."""
    out = {}
    for name, module in model.named_modules():
        if getattr(module, "quantization_scheme", None) is None or not isinstance(module, torch.nn.Linear):
            continue
        w = module.weight.detach().float()
        q, s = quantize_per_channel(w)
        err = dequantize(q, s) - w
        out[name] = {"max_abs_over_max": float(err.abs().max() / w.abs().max().clamp_min(1e-30)),
                     "rel_frobenius": float(err.norm() / w.norm().clamp_min(1e-30)),
                     "weight_scale_min": float(s.min()), "weight_scale_max": float(s.max())}
    return out


def model_from_state(config: dict, model_dir, state: dict) -> FastDVLMForConditionalGeneration:
    """The reference FP8 model (`FP8Linear`s) on the compressed tensors, as `from_pretrained`
    would load them from the written checkpoint."""
    cfg = FastDVLMConfig.from_dict(config, model_dir)
    return FastDVLMForConditionalGeneration.from_state_dict(cfg, state)


@torch.no_grad()
def build(source_logits: list[torch.Tensor], fp8_model, held: list[dict], weight_errs: dict, **settings) -> dict:
    ranges: dict[str, list[float]] = {}

    def record(name):
        def hook(_module, args):
            amax = args[0].detach().float().abs().amax(dim=-1).flatten() / FP8_MAX
            lo, hi = float(amax.min()), float(amax.max())
            old = ranges.get(name)
            ranges[name] = [lo, hi] if old is None else [min(old[0], lo), max(old[1], hi)]
        return hook

    handles = [m.register_forward_pre_hook(record(n)) for n, m in fp8_model.named_modules() if isinstance(m, FP8Linear)]
    try:
        fp8_logits = logits(fp8_model, held)
    finally:
        for h in handles:
            h.remove()
    agreement: dict[str, dict] = {}
    for s, src, got in zip(held, source_logits, fp8_logits):
        mode = s.get("mode", "causal")
        a = agreement.setdefault(mode, {"rows": 0, "top1_agree": 0, "kl_sum": 0.0})
        a["rows"] += src.shape[0]
        a["top1_agree"] += int((src.argmax(-1) == got.argmax(-1)).sum())
        a["kl_sum"] += float((src.exp() * (src - got)).sum())
    held_out = {mode: {"forwards": sum(1 for s in held if s.get("mode", "causal") == mode), "rows": a["rows"],
                       "top1_agreement": round(a["top1_agree"] / max(a["rows"], 1), 4),
                       "mean_kl": round(a["kl_sum"] / max(a["rows"], 1), 6)} for mode, a in agreement.items()}
    errs = list(weight_errs.values())
    return {
        **settings,
        "quantized_layers": len(weight_errs),
        "held_out": held_out,
        "weight_error_summary": {
            "max_abs_over_max": max((e["max_abs_over_max"] for e in errs), default=0.0),
            "mean_rel_frobenius": sum(e["rel_frobenius"] for e in errs) / max(len(errs), 1),
        },
        "layers": {name: {**weight_errs.get(name, {}), "activation_scale_range": ranges.get(name)}
                   for name in sorted(set(weight_errs) | set(ranges))},
    }


def summary(rep: dict, out) -> str:
    lines = [f"wrote {out}: {rep['quantized_layers']} linear layers in W8A8 FP8 ({rep['scheme']}, SmoothQuant "
             f"alpha {rep['alpha']}, {rep['calib_samples']} calibration forwards: {','.join(rep['calib_modes'])})"]
    for mode, h in rep["held_out"].items():
        lines.append(f"  held-out {mode}: top-1 agreement {h['top1_agreement']:.3f}, mean KL {h['mean_kl']:.4g} "
                     f"({h['rows']} positions)")
    w = rep["weight_error_summary"]
    lines.append(f"  weights: max error {w['max_abs_over_max']:.4f} of the row max, mean relative Frobenius "
                 f"{w['mean_rel_frobenius']:.4f}")
    lines.append(f"  {rep['seconds']} s, peak RSS {rep['peak_rss_mb']} MB; report: {out}/quantization_report.json")
    return "\n".join(lines)
