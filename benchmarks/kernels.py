"""Kernel benchmarks on a GPU: block-diffusion attention over a paged KV cache, FP8 W8A8 GEMM.

    python benchmarks/kernels.py                 # CUDA: both sweeps, writes results/kernels_<gpu>.json
    python benchmarks/kernels.py --only gemm     # one of them
    python benchmarks/kernels.py --tune-gemm     # CUDA: pick GEMM configs, write kernels/fp8_gemm_configs.json
    python benchmarks/kernels.py --smoke         # any machine: tiny shapes, checks the script end to end

Attention (`kernels/block_attention.py`) at the 3B's head shapes (16 query / 2 KV heads, head dim
128, bf16), query 32 (a block) and 1 (an AR step), contexts 512..16k, batch 1..16, causal and
block-bidirectional, page size 1 with a shuffled page table. Against:
- PyTorch SDPA with an explicit boolean mask over a dense copy of the same K/V (the gather is not
  timed, which favours SDPA), GQA through `enable_gqa`;
- FlashInfer's paged prefill wrapper, where FlashInfer is installed.
FP8 GEMM (`kernels/fp8_gemm.py`: per-token quantization + split-K GEMM) at M in {1, 16, 32, 64,
128, 256} on the 3B's linear shapes (K x N; SGLang fuses q/k/v and gate/up, so those fused shapes
too), against bf16 `torch.matmul` (cuBLAS) and `torch._scaled_mm` (cuBLASLt FP8, with the same
per-token quantization, timed together). Bytes = weights + activations + output. Goals (issue:
FP8 GEMM): >= 1.8x over bf16 at M = 32 on gate/up/down, >= 80% of copy bandwidth there, never
slower than `torch._scaled_mm`.

Each is timed as a replayed CUDA graph (launch overhead as served), median of `--reps` replays.
Bytes moved = K and V of every context token once + Q + output + the page-table reads; achieved
GB/s and its share of the device's measured device-to-device copy bandwidth (a 1 GiB
`Tensor.copy_`, read + write). Goals (issue: Triton attention): >= 70% of copy bandwidth at
contexts >= 4k, batch 1, query 32; never slower than SDPA.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from datetime import date
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
Q_HEADS, KV_HEADS, HEAD_DIM = 16, 2, 128


def cuda_time(fn, reps: int, graph: bool = True) -> float:
    """Median seconds of `fn()`: replays of a captured CUDA graph (eager calls on a CPU)."""
    if not torch.cuda.is_available():
        import time

        fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    run = fn
    if graph:
        try:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            run = g.replay
        except Exception:  # noqa: BLE001 - a path that cannot be captured is timed eagerly
            run = fn
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_bandwidth(device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / cuda_time(lambda: dst.copy_(src), reps=20, graph=False)


def paged_case(batch: int, context: int, new: int, dtype, device, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    total = context + new
    slots = batch * total + 1
    perm = (torch.randperm(slots - 1, generator=gen) + 1).int()
    table = perm[:batch * total].view(batch, total).to(device)
    k = torch.randn(slots, KV_HEADS, HEAD_DIM, generator=gen).to(device, dtype)
    v = torch.randn(slots, KV_HEADS, HEAD_DIM, generator=gen).to(device, dtype)
    q = torch.randn(batch * new, Q_HEADS, HEAD_DIM, generator=gen).to(device, dtype)
    lens = torch.full((batch,), new, dtype=torch.int32, device=device)
    return dict(q=q, k_cache=k, v_cache=v, req_to_token=table,
                req_pool_indices=torch.arange(batch, dtype=torch.int32, device=device),
                q_start=torch.arange(0, batch * new, new, dtype=torch.int32, device=device), q_lens=lens,
                seq_lens=torch.full((batch,), total, dtype=torch.int32, device=device))


def bench_attention(batch: int, context: int, new: int, causal: bool, dtype, device, reps: int, copy_bw: float,
                    config=None) -> dict:
    from fast_dvlm_sglang.kernels.block_attention import block_attention, default_config

    case = paged_case(batch, context, new, dtype, device)
    config = config or default_config(device)
    out = torch.empty_like(case["q"])
    total = context + new
    ours = cuda_time(lambda: block_attention(*case.values(), max_q_len=new, causal=causal, out=out, config=config), reps)
    # SDPA over a dense copy (not timed) with an explicit mask
    slots = case["req_to_token"].long()
    kd = case["k_cache"][slots].permute(0, 2, 1, 3).contiguous()  # [B, Hkv, S, D]
    vd = case["v_cache"][slots].permute(0, 2, 1, 3).contiguous()
    qd = case["q"].view(batch, new, Q_HEADS, HEAD_DIM).transpose(1, 2)
    if causal:
        mask = torch.arange(total, device=device)[None, :] <= context + torch.arange(new, device=device)[:, None]
    else:
        mask = torch.ones(new, total, dtype=torch.bool, device=device)
    sdpa = cuda_time(lambda: torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask,
                                                                               enable_gqa=True), reps)
    elem = case["k_cache"].element_size()
    moved = 2 * batch * total * KV_HEADS * HEAD_DIM * elem + 2 * case["q"].numel() * elem + batch * total * 4
    row = {"batch": batch, "context": context, "query": new, "mode": "causal" if causal else "block_bidirectional",
           "ours_us": round(ours * 1e6, 2), "sdpa_us": round(sdpa * 1e6, 2), "speedup_vs_sdpa": round(sdpa / ours, 3),
           "bytes_moved": moved, "ours_gbps": round(moved / ours / 1e9, 1),
           "ours_pct_of_copy_bw": round(100 * moved / ours / copy_bw, 1)}
    flashinfer = _flashinfer_time(case, batch, total, new, causal, dtype, device, reps)
    if flashinfer is not None:
        row["flashinfer_us"] = round(flashinfer * 1e6, 2)
    return row


def _flashinfer_time(case, batch, total, new, causal, dtype, device, reps):
    try:
        import flashinfer
    except ImportError:
        return None
    workspace = torch.empty(128 << 20, dtype=torch.uint8, device=device)
    wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")
    qo_indptr = torch.arange(0, (batch + 1) * new, new, dtype=torch.int32, device=device)
    kv_indptr = torch.arange(0, (batch + 1) * total, total, dtype=torch.int32, device=device)
    wrapper.plan(qo_indptr, kv_indptr, case["req_to_token"].reshape(-1), torch.ones(batch, dtype=torch.int32, device=device),
                 Q_HEADS, KV_HEADS, HEAD_DIM, 1, causal=causal, q_data_type=dtype)
    k = case["k_cache"].unsqueeze(1)
    v = case["v_cache"].unsqueeze(1)
    return cuda_time(lambda: wrapper.run(case["q"], (k, v)), reps)


GEMM_SHAPES = {  # name: (K, N), the 3B's text tower
    "q_proj/o_proj": (2048, 2048), "k_proj/v_proj": (2048, 256), "gate_proj/up_proj": (2048, 11008),
    "down_proj": (11008, 2048), "qkv_fused": (2048, 2560), "gate_up_fused": (2048, 22016),
    "lm_head": (2048, 151936),
}
GEMM_M = (1, 16, 32, 64, 128, 256)


def gemm_case(m, k, n, dtype, device, seed=0):
    from fast_dvlm_sglang.quantize.fp8 import quantize_per_channel

    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    w = torch.randn(n, k, generator=gen).to(device) * 0.02
    wq, ws = quantize_per_channel(w)
    return x, wq, ws, w.to(dtype)


def bench_gemm(name, m, k, n, dtype, device, reps, copy_bw, config=None) -> dict:
    from fast_dvlm_sglang.kernels.fp8_gemm import fp8_gemm
    from fast_dvlm_sglang.quantize.fp8 import fp8_linear, quantize_per_token

    x, wq, ws, w16 = gemm_case(m, k, n, dtype, device)
    out = torch.empty((m, n), dtype=dtype, device=device)
    ours = cuda_time(lambda: fp8_gemm(x, wq, ws, out=out, config=config), reps)
    bf16 = cuda_time(lambda: torch.matmul(x, w16.t()), reps)
    row = {"shape": name, "m": m, "k": k, "n": n, "ours_us": round(ours * 1e6, 2), "bf16_us": round(bf16 * 1e6, 2),
           "speedup_vs_bf16": round(bf16 / ours, 3)}
    moved = n * k + n * 4 + m * k * x.element_size() + m * n * x.element_size()
    row.update(bytes_moved=moved, ours_gbps=round(moved / ours / 1e9, 1),
               ours_pct_of_copy_bw=round(100 * moved / ours / copy_bw, 1))
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9):
        sw = ws.reshape(1, -1)

        def scaled_mm():
            xq, sx = quantize_per_token(x)
            return torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=sw, out_dtype=dtype)

        sm = cuda_time(scaled_mm, reps)
        row.update(scaled_mm_us=round(sm * 1e6, 2), speedup_vs_scaled_mm=round(sm / ours, 3))
    want = fp8_linear(x, wq, ws, use_scaled_mm=False, out_dtype=torch.float32)
    got = fp8_gemm(x, wq, ws, config=config).float()
    row["max_rel_err_vs_fp8_linear"] = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
    return row


def tune_gemm(dtype, device, reps) -> dict:
    """Per (M bucket, N, K): the fastest of a small grid of configs (CUDA-graph replays)."""
    import itertools

    from fast_dvlm_sglang.kernels.fp8_gemm import GemmConfig, fp8_gemm, heuristic_config

    chosen = {}
    for (k, n), m in itertools.product(sorted(set(GEMM_SHAPES.values())), GEMM_M):
        x, wq, ws, _ = gemm_case(m, k, n, dtype, device)
        out = torch.empty((m, n), dtype=dtype, device=device)
        best = (float("inf"), heuristic_config(m, n, k, torch.cuda.get_device_properties(device).multi_processor_count))
        block_ms = [b for b in (16, 32, 64) if b <= max(16, m)]
        for bm, bn, bk, split, warps, stages in itertools.product(
                block_ms, (32, 64, 128), (64, 128, 256), (1, 2, 4, 8, 16), (4, 8), (3, 4)):
            if split > 1 and k // split < 2 * bk:
                continue
            cfg = GemmConfig(bm, bn, bk, split, warps, stages)

            def run(c=cfg, x=x, wq=wq, ws=ws, out=out):
                return fp8_gemm(x, wq, ws, out=out, config=c)

            try:
                t = cuda_time(run, reps)
            except Exception:  # noqa: BLE001 - a config the compiler rejects (resources) is skipped
                continue
            best = min(best, (t, cfg), key=lambda p: p[0])
        from fast_dvlm_sglang.kernels.fp8_gemm import m_bucket

        chosen[f"{m_bucket(m)}x{n}x{k}"] = best[1]
        print(f"tuned M={m} K={k} N={n}: {best[1]} {best[0] * 1e6:.1f} us", flush=True)
    return chosen


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU: Triton's interpreter), no JSON written")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--out", default=None, help="JSON path (default: results/kernels_<device>.json)")
    p.add_argument("--only", choices=("attention", "gemm"), default=None)
    p.add_argument("--tune-gemm", action="store_true", help="pick FP8 GEMM configs and write the committed table")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        raise SystemExit("benchmarks/kernels.py: needs a CUDA GPU (use --smoke to check the script on a CPU)")
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    name = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
    if args.tune_gemm:
        if not cuda:
            raise SystemExit("benchmarks/kernels.py --tune-gemm: needs a CUDA GPU")
        from fast_dvlm_sglang.kernels.fp8_gemm import write_config_table

        write_config_table(name, tune_gemm(dtype, device, 20), "python benchmarks/kernels.py --tune-gemm")
        print("wrote kernels/fp8_gemm_configs.json")
        return 0
    copy_bw = copy_bandwidth(device, 1 << 30 if cuda else 1 << 24)
    if args.smoke:
        shapes = [(1, 64, 32), (2, 40, 1)]
        gemm = [("smoke", m, 96, 80) for m in (1, 33)]
        reps = 2
    else:
        shapes = [(b, c, q) for q in (32, 1) for b in (1, 4, 16) for c in (512, 1024, 2048, 4096, 8192, 16384)]
        gemm = [(name_, m, k, n) for name_, (k, n) in GEMM_SHAPES.items() for m in GEMM_M]
        reps = args.reps
    record = {"date": date.today().isoformat(), "device": name, "torch": torch.__version__,
              "copy_bandwidth_gbps": round(copy_bw / 1e9, 1), "dtype": str(dtype).replace("torch.", "")}
    if args.only in (None, "attention"):
        rows = []
        for batch, context, new in shapes:
            for causal in (True, False) if new > 1 else (True,):
                row = bench_attention(batch, context, new, causal, dtype, device, reps, copy_bw)
                rows.append(row)
                print(json.dumps(row), flush=True)
        record["heads"] = {"q": Q_HEADS, "kv": KV_HEADS, "dim": HEAD_DIM}
        record["attention"] = rows
    if args.only in (None, "gemm"):
        rows = []
        for shape_name, m, k, n in gemm:
            row = bench_gemm(shape_name, m, k, n, dtype, device, reps, copy_bw)
            rows.append(row)
            print(json.dumps(row), flush=True)
        record["fp8_gemm"] = rows
    try:
        import triton

        record["triton"] = triton.__version__
    except ImportError:
        pass
    if args.smoke:
        return 0
    out = Path(args.out) if args.out else RESULTS / f"kernels_{name.replace(' ', '_').lower()}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print("wrote", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
