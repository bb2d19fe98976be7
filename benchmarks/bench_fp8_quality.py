"""FP8 quality on the demo task: source vs W8A8 FP8 for AR, MDM and spec, and the calibration modes.

    .venv/bin/python benchmarks/bench_fp8_quality.py [--n 200] [--seeds 1234,777,4242,99]

In one run: `fast-dvlm quantize --model demo` twice (calibrated on causal forwards only, the
default, and on causal + block-bidirectional draft forwards), their reports' held-out agreement
per attention mode (the calibration-mode decision), then `eval-demo` (accuracy, tokens/NFE) of the
source and the default FP8 checkpoint for each algorithm on several held-out seeds (n each; one
seed's 200 answers differ by +-1 point between two equally good models: 2-5 answers of 200 flip),
per seed and pooled, the checkpoint sizes and the language
tower's weight bytes (demo and the real 3B configuration, `quantize/footprint.py`).
Writes `benchmarks/results/fp8_quality_cpu_demo.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import tempfile
from datetime import date
from pathlib import Path

from fast_dvlm_sglang.config import FastDVLMConfig
from fast_dvlm_sglang.demo import DEMO_CHECKPOINT
from fast_dvlm_sglang.demo.evaluate import evaluate
from fast_dvlm_sglang.quantize.export import quantize
from fast_dvlm_sglang.quantize.footprint import language_tower_bytes
from fast_dvlm_sglang.random_checkpoint import FAST_DVLM_3B_TEXT, FAST_DVLM_3B_VOCAB

RESULTS = Path(__file__).parent / "results"


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def footprints() -> dict:
    demo = FastDVLMConfig.from_dir(DEMO_CHECKPOINT).text
    big = dataclasses.replace(demo, vocab_size=FAST_DVLM_3B_VOCAB, tie_word_embeddings=True,
                              **{k: tuple(v) if isinstance(v, list) else v for k, v in FAST_DVLM_3B_TEXT.items()})
    out = {}
    for name, cfg in (("demo", demo), ("fast_dvlm_3b", big)):
        bf16, fp8 = language_tower_bytes(cfg, fp8=False), language_tower_bytes(cfg, fp8=True)
        out[name] = {"bf16_linear_mb": round(bf16.linear_weights / 1e6, 2), "fp8_linear_mb": round(fp8.linear_weights / 1e6, 2),
                     "bf16_tower_mb": round(bf16.total / 1e6, 2), "fp8_tower_mb": round(fp8.total / 1e6, 2),
                     "tower_ratio": round(fp8.total / bf16.total, 3)}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seeds", default="1234,777,4242,99", help="held-out eval seeds (comma-separated)")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    record = {"date": date.today().isoformat(), "device": "cpu", "host": platform.node(), "model": "demo",
              "eval": {"n_per_seed": args.n, "seeds": seeds}}
    with tempfile.TemporaryDirectory(prefix="bench_fp8_") as tmp:
        reports = {}
        for modes in (("causal",), ("causal", "draft")):
            out = Path(tmp) / "-".join(modes)
            reports["+".join(modes)] = quantize("demo", out, calib_modes=modes, progress=False)
        record["calibration_modes"] = {k: {"held_out": r["held_out"], "seconds": r["seconds"],
                                           "peak_rss_mb": r["peak_rss_mb"]} for k, r in reports.items()}
        print(json.dumps(record["calibration_modes"], indent=1), flush=True)
        fp8_dir = Path(tmp) / "causal"  # the default (`--calib-modes causal`, chosen from the numbers above)
        record["checkpoint_bytes"] = {"source": _dir_bytes(DEMO_CHECKPOINT), "fp8": _dir_bytes(fp8_dir)}
        table = {}
        for algorithm in ("ar", "mdm", "spec"):
            row = table.setdefault(algorithm, {"per_seed": {}})
            for label, model in (("source", DEMO_CHECKPOINT), ("fp8", fp8_dir)):
                runs = []
                for seed in seeds:
                    rep = evaluate(str(model), algorithm, n=args.n, seed=seed, progress=False)
                    runs.append({k: rep[k] for k in ("accuracy", "tokens_per_nfe", "nfe", "avg_answer_tokens")})
                    row["per_seed"].setdefault(str(seed), {})[label] = runs[-1]["accuracy"]
                    print(algorithm, label, seed, runs[-1], flush=True)
                tokens = sum(r["tokens_per_nfe"] * r["nfe"] for r in runs)
                row[label] = {"accuracy": round(sum(r["accuracy"] for r in runs) / len(runs), 4),
                              "tokens_per_nfe": round(tokens / sum(r["nfe"] for r in runs), 4),
                              "nfe": sum(r["nfe"] for r in runs)}
            s, f = row["source"], row["fp8"]
            for acc in row["per_seed"].values():
                acc["points"] = round(100 * (acc["fp8"] - acc["source"]), 2)
            row["accuracy_points_fp8_minus_source"] = round(100 * (f["accuracy"] - s["accuracy"]), 2)
            row["tokens_per_nfe_ratio"] = round(f["tokens_per_nfe"] / s["tokens_per_nfe"], 4)
        record["table"] = table
    record["language_tower_weights"] = footprints()
    out = RESULTS / "fp8_quality_cpu_demo.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["table"], indent=1))
    print("wrote", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
