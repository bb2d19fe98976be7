"""`fast-dvlm bench forward`: model-level forward timings of the PyTorch reference.

On the real Fast-dVLM 3B configuration with random weights (nothing downloaded), for each
precision, context length C and batch size B, three forwards over a preallocated KV cache
(`StaticKVCache`, C tokens of context per sequence):
- `ar_step`: 1 token, causal, KV written (an AR decode step);
- `draft_block`: `block_size` tokens, block-bidirectional, KV not kept (spec's draft, MDM's step);
- `verify_block`: `block_size` tokens, causal, KV written (spec's verify pass).
On CUDA each forward is captured once as a CUDA graph and replayed (`--reps` replays, median of
CUDA-event timings): launch overhead as a served step has it. Attention runs through our Triton
kernel (`kernels/block_attention.py`) and FP8 linears through our FP8 GEMM (`kernels/fp8_gemm.py`)
where the device supports them; elsewhere (CPU) the reference's SDPA and `fp8_linear`, eager.

In the same run:
- the roofline of each forward: bytes it must move (every weight of the text tower and LM head
  once, the K and V of every context token read, the new tokens' K and V written) over the
  device's measured copy bandwidth (a 1 GiB device-to-device `copy_`, read + write);
- transformers' `Qwen2_5_VLForConditionalGeneration.generate` (eager, greedy, batch 1, the same
  weights) at each context: the paper's AR baseline analogue, in tokens/s;
- projected tokens/s = measured forwards/s x tokens/NFE. Random weights accept no drafts, so
  this is a projection, labelled so, for the tokens/NFE named: the paper's (MDM 1.95, spec 2.63)
  and the demo model's as served (`results/bench_serve_cpu_demo.json`, if present). A spec round
  is a draft and a verify forward (2 NFE), an MDM step a draft-shaped forward, AR a step.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .serving_metrics import SCHEMA, environment

PAPER_TOKENS_PER_NFE = {"mdm": 1.95, "spec": 2.63}
FORWARDS = ("ar_step", "draft_block", "verify_block")


@dataclass(frozen=True)
class ForwardShape:
    name: str
    tokens: int
    bidirectional: bool
    write: bool


def forward_shapes(block_size: int) -> list[ForwardShape]:
    return [ForwardShape("ar_step", 1, False, True), ForwardShape("draft_block", block_size, True, False),
            ForwardShape("verify_block", block_size, False, True)]


class StaticKVCache:
    """The reference's `KVCache` over preallocated [B, Hkv, C + T_max, D] buffers per layer, with
    `context` tokens of (random) context: a forward's new K/V go to slots [C, C + T) and attention
    reads [0, C + T) in place (`window`), so a forward has fixed shapes (CUDA graphs) and moves
    what a paged serving cache moves. The length never advances: every forward of a benchmark
    sees the same context."""

    def __init__(self, layers: int, batch: int, kv_heads: int, head_dim: int, context: int, max_new: int,
                 dtype: torch.dtype, device):
        shape = (batch, kv_heads, context + max_new, head_dim)
        gen = torch.Generator(device=device).manual_seed(0)
        self.k = [torch.randn(shape, dtype=dtype, device=device, generator=gen) for _ in range(layers)]
        self.v = [torch.randn(shape, dtype=dtype, device=device, generator=gen) for _ in range(layers)]
        self.context = context

    @property
    def length(self) -> int:
        return self.context

    def read(self, layer: int):
        return self.k[layer][:, :, :self.context], self.v[layer][:, :, :self.context]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        n = k.shape[2]
        self.k[layer][:, :, self.context:self.context + n].copy_(k)
        self.v[layer][:, :, self.context:self.context + n].copy_(v)

    def window(self, layer: int, k: torch.Tensor, v: torch.Tensor, persist: bool):
        self.append(layer, k, v)  # scratch slots past the context either way: `persist` changes nothing here
        end = self.context + k.shape[2]
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def truncate(self, length: int) -> None:
        pass


def model_config(name: str):
    from fast_dvlm_sglang.config import FastDVLMConfig
    from fast_dvlm_sglang.random_checkpoint import random_config

    if name == "fast-dvlm-3b":
        return FastDVLMConfig.from_dict(random_config())
    # tiny: the shapes the tests use (2 layers), for CPU runs of the benchmark itself
    return FastDVLMConfig.from_dict(random_config(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, mrope_section=[2, 3, 3]),
        vision=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                    fullatt_block_indexes=[0]), vocab_size=1024))


def build_model(cfg, precision: str, device, dtype: torch.dtype, *, attention: str = "triton",
                fp8_gemm: str = "triton"):
    """Our reference model with random weights (default initialisation), FP8 linears in the text
    tower's decoder layers for `fp8` (lm_head and the vision tower stay in `dtype`, as our
    quantizer's scheme keeps them). On CUDA attention runs in our Triton kernel and FP8 products in
    our Triton GEMM unless `attention="sdpa"` / `fp8_gemm="scaled_mm"` (`torch._scaled_mm`)."""
    from fast_dvlm_sglang.model import FastDVLMForConditionalGeneration
    from fast_dvlm_sglang.quantize.fp8 import FP8Linear

    torch.manual_seed(0)
    with torch.device(device):
        model = FastDVLMForConditionalGeneration(cfg).to(dtype).eval()
    if precision == "fp8":
        for layer in model.model.language_model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, child in list(parent.named_children()):
                    if isinstance(child, torch.nn.Linear):
                        setattr(parent, name, FP8Linear.from_linear(child))
    set_paths(model, attention=attention if device.type == "cuda" else "sdpa", fp8_gemm=fp8_gemm)
    return model


def set_paths(model, *, attention: str, fp8_gemm: str) -> None:
    """Which implementation the model's attention and FP8 linears run (see `build_model`)."""
    from fast_dvlm_sglang.quantize.fp8 import FP8Linear

    model.use_attention_kernel(attention == "triton")
    for module in model.modules():
        if isinstance(module, FP8Linear):
            module.use_triton = fp8_gemm == "triton"
    model.bench_paths = {"attention": attention, "fp8_gemm": fp8_gemm}


def check_paths(model, cfg, context: int, block_size: int, dtype: torch.dtype) -> dict:
    """Logits of the paths being timed against the oracle paths, on one draft and one verify
    forward (batch 2): relative L2 error (||a - b|| / ||b||) of our Triton attention against SDPA
    and, for FP8, of our Triton GEMM against `fp8_linear` (`torch._scaled_mm`), and the share of
    positions whose argmax agrees. Same math, other rounding: bf16 logits part by ~1e-2."""
    from fast_dvlm_sglang.attention_masks import block_bidirectional_mask, causal_mask

    device, paths = model.device, dict(model.bench_paths)
    t = cfg.text
    ids = torch.randint(0, 500, (2, block_size), device=device)
    pos = (torch.arange(block_size, device=device) + context).view(1, 1, -1).expand(3, 2, -1).contiguous()
    out = {}
    for name, mask in (("draft", block_bidirectional_mask(block_size, context, device=device)),
                       ("verify", causal_mask(block_size, context, device=device))):
        logits = {}
        for label, attention, gemm in (("timed", paths["attention"], paths["fp8_gemm"]), ("oracle", "sdpa", "reference")):
            set_paths(model, attention=attention, fp8_gemm=gemm if gemm != "reference" else "scaled_mm")
            cache = StaticKVCache(t.num_hidden_layers, 2, t.num_key_value_heads, t.head_dim, context, block_size,
                                  dtype, device)
            with torch.inference_mode():
                logits[label] = model(model.model.language_model.embed_tokens(ids), pos, mask, cache,
                                      write_cache=name == "verify").float()
        a, b = logits["timed"], logits["oracle"]
        out[name] = {"rel_l2": float((a - b).norm() / b.norm()), "argmax_agree": float((a.argmax(-1) == b.argmax(-1))
                                                                                       .float().mean())}
    set_paths(model, **paths)
    return out


def text_weight_bytes(model) -> int:
    """Bytes of every parameter a text forward reads: decoder layers, final norm, LM head (the
    embedding rows read are negligible; a tied LM head counts once)."""
    lm = model.model.language_model
    seen, total = set(), 0
    for module in (lm.layers, lm.norm, model.lm_head):
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
    return total


def kv_bytes(cfg, shape: ForwardShape, batch: int, context: int, elem: int) -> int:
    t = cfg.text
    per_token = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * elem
    return batch * per_token * (context + shape.tokens + (shape.tokens if shape.write else 0))


def copy_bandwidth(device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth, bytes/s counted read + write (best of 5)."""
    if device.type != "cuda":
        nbytes = min(nbytes, 256 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(6):
        seconds = _timed(lambda: dst.copy_(src), device, reps=1)
        best = min(best, seconds)
    return 2 * nbytes / best


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, reps: int) -> float:
    """Median seconds of `fn` over `reps` calls (CUDA events on a GPU)."""
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_forward(model, cfg, shape: ForwardShape, batch: int, context: int, *, graphs: bool, reps: int,
                 dtype: torch.dtype) -> float:
    """Median seconds of one forward of `shape` at (batch, context)."""
    from fast_dvlm_sglang.attention_masks import block_bidirectional_mask, causal_mask

    device = model.device
    t = cfg.text
    cache = StaticKVCache(t.num_hidden_layers, batch, t.num_key_value_heads, t.head_dim, context, shape.tokens,
                          dtype, device)
    ids = torch.randint(0, 500, (batch, shape.tokens), device=device)
    pos = (torch.arange(shape.tokens, device=device) + context).view(1, 1, -1).expand(3, batch, -1).contiguous()
    mask = (block_bidirectional_mask if shape.bidirectional else causal_mask)(shape.tokens, context, device=device)
    embed = model.model.language_model.embed_tokens

    def step():
        return model(embed(ids), pos, mask, cache, write_cache=shape.write)

    with torch.inference_mode():
        if graphs:
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for _ in range(3):  # Triton autotuning / compilation, allocator warm-up
                    step()
            torch.cuda.current_stream(device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            _sync(device)
            run = graph.replay
        else:
            step()
            run = step
        run()
        _sync(device)
        seconds = _timed(run, device, reps)
    return seconds


def transformers_twin(model, cfg, device, dtype):
    """transformers' `Qwen2_5_VLForConditionalGeneration` holding our model's weights (the same
    architecture: our checkpoint format is Qwen2.5-VL's; tests check the logits agree)."""
    import transformers
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    transformers.logging.set_verbosity_error()  # rope_scaling / mrope_section key chatter
    raw = {k: v for k, v in cfg.raw.items() if k != "quantization_config"}
    raw.update(architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl")
    with torch.device(device):
        hf = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**raw)).to(dtype).eval()
    missing, _ = hf.load_state_dict(model.state_dict(), strict=False)
    if [k for k in missing if "rotary" not in k]:
        raise RuntimeError(f"transformers' Qwen2.5-VL does not take our weights: missing {missing[:3]}")
    return hf


def transformers_baseline(model, cfg, contexts: list[int], new_tokens: int, device, dtype) -> dict[int, float]:
    """Greedy tokens/s of transformers' eager `generate` on our model's weights, batch 1, a
    `context`-token random prompt, exactly `new_tokens` generated (EOS ignored), per context."""
    hf = transformers_twin(model, cfg, device, dtype)
    out = {}
    with torch.inference_mode():
        for context in contexts:
            ids = torch.randint(0, 500, (1, context), device=device)
            hf.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
            _sync(device)
            t0 = time.perf_counter()
            gen = hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            _sync(device)
            out[context] = (gen.shape[1] - context) / (time.perf_counter() - t0)
    del hf
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# What a failing timed path falls back to, in order (each tried alone, then all together); the
# first that works stays for the rest of the run and is recorded in the report's settings.
FALLBACKS = ({"attention": "sdpa"}, {"fp8_gemm": "scaled_mm"}, {"graphs": False})


def time_forward_robust(model, cfg, shape: ForwardShape, batch: int, context: int, *, state: dict, reps: int,
                        dtype: torch.dtype) -> float | None:
    """`time_forward` on the paths in `state` (attention, fp8_gemm, graphs); if it raises (a kernel
    that does not compile on this GPU, a graph that cannot be captured), the `FALLBACKS` in turn.
    None (and the error in `state["failed"]`) if nothing works for this cell."""
    def attempt(paths: dict) -> float:
        set_paths(model, attention=paths["attention"], fp8_gemm=paths["fp8_gemm"])
        return time_forward(model, cfg, shape, batch, context, graphs=paths["graphs"], reps=reps, dtype=dtype)

    current = {k: state[k] for k in ("attention", "fp8_gemm", "graphs")}
    try:
        return attempt(current)
    except Exception as e:  # noqa: BLE001 - recorded, then the fallbacks
        error = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    merged = {k: v for f in FALLBACKS for k, v in f.items()}
    for fallback in (*FALLBACKS, merged):
        trial = {**current, **fallback}
        if trial == current:
            continue
        try:
            seconds = attempt(trial)
        except Exception:  # noqa: BLE001 - the next fallback
            continue
        state.update(trial)
        state.setdefault("fallbacks", []).append({"at": f"{shape.name} B={batch} C={context}", "error": error,
                                                  "now": trial})
        print(f"fast-dvlm bench: {error}; falling back to {trial}", flush=True)
        return seconds
    set_paths(model, attention=current["attention"], fp8_gemm=current["fp8_gemm"])
    state.setdefault("failed", []).append({"at": f"{shape.name} B={batch} C={context}", "error": error})
    print(f"fast-dvlm bench: {shape.name} B={batch} C={context} failed on every path: {error}", flush=True)
    return None


def demo_tokens_per_nfe() -> dict[str, float]:
    """The demo model's served tokens/NFE (`bench serve` on the demo, batch 1), if measured."""
    path = Path(__file__).parent / "results" / "bench_serve_cpu_demo.json"
    if not path.is_file():
        return {}
    out = {}
    for row in json.loads(path.read_text()).get("summary", []):
        if row.get("batch_size") == 1 and row.get("precision") == "bf16" and row.get("tokens_per_nfe"):
            if row["algorithm"] in ("mdm", "spec"):
                out[row["algorithm"]] = row["tokens_per_nfe"]
    return out


def bench_setup(args):
    """(device, CUDA graphs on, compute dtype, model config) of a model-level benchmark's flags:
    CUDA if there is one (bf16, graphs unless --no-graphs), else CPU (float32, eager)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    graphs = device.type == "cuda" and not args.no_graphs
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, graphs, dtype, model_config(args.config)


def forward_bench(args) -> dict:
    device, graphs, dtype, cfg = bench_setup(args)
    bandwidth = copy_bandwidth(device)
    ratios = {"paper": PAPER_TOKENS_PER_NFE, "demo": demo_tokens_per_nfe()}
    rows, baseline, checks, states = [], {}, {}, {}
    for precision in args.precisions:
        if precision == "fp8" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
            raise SystemExit("fast-dvlm bench forward: fp8 needs an SM89+ GPU (float8 tensor cores)")
        state = {"attention": args.attention if device.type == "cuda" else "sdpa", "fp8_gemm": args.fp8_gemm,
                 "graphs": graphs}
        states[precision] = state
        model = build_model(cfg, precision, device, dtype, attention=state["attention"], fp8_gemm=state["fp8_gemm"])
        weights = text_weight_bytes(model)
        if precision == args.precisions[0] and args.baseline_new_tokens > 0:
            baseline = transformers_baseline(model, cfg, args.contexts, args.baseline_new_tokens, device, dtype)
        if device.type == "cuda":
            try:
                checks[precision] = check_paths(model, cfg, min(args.contexts), args.block_size, dtype)
            except Exception as e:  # noqa: BLE001 - a broken path shows in the timings' fallbacks too
                checks[precision] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            if not args.quiet:
                print(f"{precision} paths vs oracle: {checks[precision]}", flush=True)
        for context in args.contexts:
            for batch in args.batch_sizes:
                times = {}
                for shape in forward_shapes(args.block_size):
                    seconds = time_forward_robust(model, cfg, shape, batch, context, state=state, reps=args.reps,
                                                  dtype=dtype)
                    if seconds is None:
                        continue
                    nbytes = weights + kv_bytes(cfg, shape, batch, context, torch.finfo(dtype).bits // 8)
                    times[shape.name] = seconds
                    rows.append({"precision": precision, "context": context, "batch_size": batch,
                                 "forward": shape.name, "tokens": shape.tokens * batch, "ms": seconds * 1e3,
                                 "bytes": nbytes, "roofline_ms": nbytes / bandwidth * 1e3,
                                 "x_roofline": seconds / (nbytes / bandwidth),
                                 "paths": {k: state[k] for k in ("attention", "fp8_gemm", "graphs")}})
                    if not args.quiet:
                        print(f"{precision} C={context} B={batch} {shape.name}: {seconds * 1e3:.3f} ms "
                              f"({seconds / (nbytes / bandwidth):.2f}x roofline)", flush=True)
                if len(times) == len(FORWARDS):
                    _add_projection(rows, times, batch, ratios)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    summary = _summary(rows, baseline, args.precisions)
    return {"schema": SCHEMA, "kind": "forward", "environment": environment(),
            "settings": {"model": f"{args.config} (random weights)", "contexts": args.contexts,
                         "batch_sizes": args.batch_sizes, "block_size": args.block_size, "reps": args.reps,
                         "cuda_graphs": graphs, "compute_dtype": str(dtype).replace("torch.", ""),
                         "copy_bandwidth_GBps": bandwidth / 1e9, "tokens_per_nfe_used": ratios,
                         "paths": states,
                         "command": " ".join(["fast-dvlm", "bench", *getattr(args, "argv", [])])},
            "summary": summary, "forwards": rows, "path_checks": checks,
            "transformers_eager_ar_tokens_per_s": {str(k): v for k, v in baseline.items()},
            "notes": {"projected": "projected TPS = measured forwards/s x the tokens/NFE named "
                                   "(random weights accept nothing)",
                      "roofline": "bytes (weights + KV read + KV written) / measured copy bandwidth",
                      "path_checks": "logits of the timed paths vs SDPA / fp8_linear (relative L2, argmax agreement)"}}


def _add_projection(rows: list[dict], times: dict[str, float], batch: int, ratios: dict) -> None:
    """Projected tokens/s per sequence for each forward set of one (precision, context, batch)."""
    for row in rows[-len(times):]:
        row["projected_tokens_per_s"] = {
            "ar": batch / times["ar_step"],
            **{f"spec ({src} {r['spec']})": batch * r["spec"] / ((times["draft_block"] + times["verify_block"]) / 2)
               for src, r in ratios.items() if "spec" in r},
            **{f"mdm ({src} {r['mdm']})": batch * r["mdm"] / times["draft_block"]
               for src, r in ratios.items() if "mdm" in r},
        }


def _summary(rows: list[dict], baseline: dict, precisions: list[str]) -> list[dict]:
    """One row per (precision, batch, context, algorithm) in the bench report's schema: the
    projected aggregate tokens/s, its ratio to AR steps of the same precision and batch."""
    out = []
    for r in rows:
        if r["forward"] != "verify_block" or "projected_tokens_per_s" not in r:
            continue
        proj = r["projected_tokens_per_s"]
        ar = proj["ar"]
        for name, tps in proj.items():
            algorithm = name.split(" ")[0]
            tpn = 1.0 if algorithm == "ar" else float(name.rsplit(" ", 1)[1].rstrip(")"))
            out.append({"algorithm": algorithm, "variant": name, "precision": r["precision"],
                        "batch_size": r["batch_size"], "context": r["context"], "output_tokens_per_s": tps,
                        "tokens_per_nfe": tpn, "ratio_to_ar": tps / ar, "projected": algorithm != "ar",
                        "x_transformers_eager": (tps / baseline[r["context"]]
                                                 if baseline.get(r["context"]) and r["batch_size"] == 1 else None)})
    return out


def forward_markdown(report: dict) -> str:
    """The forwards table and the projections at batch 1."""
    lines = ["| precision | context | batch | forward | ms | roofline ms | x roofline |", "|---|---|---|---|---|---|---|"]
    for r in report["forwards"]:
        lines.append(f"| {r['precision']} | {r['context']} | {r['batch_size']} | {r['forward']} | {r['ms']:.3f} | "
                     f"{r['roofline_ms']:.3f} | {r['x_roofline']:.2f} |")
    lines += ["", "| precision | context | batch | tokens/s (projected unless ar) | x AR | x transformers eager |",
              "|---|---|---|---|---|---|"]
    for r in report["summary"]:
        x = r["x_transformers_eager"]
        lines.append(f"| {r['precision']} | {r['context']} | {r['batch_size']} | {r['variant']}: "
                     f"{r['output_tokens_per_s']:.1f} | {r['ratio_to_ar']:.2f} | {'-' if x is None else f'{x:.2f}'} |")
    base = report.get("transformers_eager_ar_tokens_per_s") or {}
    if base:
        lines += ["", "transformers eager generate, batch 1 (tokens/s): "
                  + ", ".join(f"context {k}: {v:.1f}" for k, v in base.items())]
    return "\n".join(lines) + "\n"
