#!/usr/bin/env bash
# The GPU suite, one command on a GPU machine, within 10 minutes (a lent machine's one call):
#   benchmarks/gpu.sh       # writes into benchmarks/results/ (GPU_OUT=DIR: elsewhere; GPU_BUDGET_S: total seconds, 570)
# Needs PyTorch, Triton and transformers (the lent GPU machines have them; SGLang and a network are
# not needed; pytest and hypothesis for step 1). In order, each step limited in time, a failing
# step reported and the next one run:
#   1. the kernels against their PyTorch references on this GPU (tests/test_block_attention.py,
#      tests/test_fp8_gemm.py), and the FP8 reference (tests/test_fp8.py); a kernel whose tests
#      fail is replaced by the PyTorch path (SDPA, torch._scaled_mm) in the timings below, and the
#      report says so;
#   2. `fast-dvlm bench forward`: an AR step, a draft block and a verify block of the reference on
#      the real Fast-dVLM 3B configuration with random weights, bf16 and FP8, under CUDA graphs,
#      next to transformers' eager generate and the copy-bandwidth roofline
#      (bench_forward_cuda_fast-dvlm-3b.{json,md,png});
#   3. `fast-dvlm bench cost-table`: the draft policy's forward cost table at batch 1..64 and the
#      draft lengths it implies (forward_cost_cuda_fast-dvlm-3b.{json,md});
#   4. benchmarks/kernels.py: attention and FP8 GEMM timings against SDPA and cuBLAS
#      (kernels_<gpu>.json).
# Exits non-zero if a step failed. GPU_SH_DRY_RUN=1: the same steps on a CPU with the tiny model,
# tiny grids and the kernel tests only collected (tests/test_bench.py runs it so).
set -uo pipefail
. "$(dirname "$0")/gpu_env.sh"
if [ -n "${GPU_SH_DRY_RUN:-}" ]; then
    gpu_env gpu.sh --no-gpu
    dev=cpu
    model=(--config tiny --device cpu --reps 2)
    forward_grid=(--contexts 16,24 --batch-sizes 1,2 --block-size 8 --baseline-new-tokens 2)
    cost_grid=(--contexts 16,24 --batch-sizes 1,2 --widths 1,4)
    pytest_mode=(--collect-only)
    kernels_mode=(--smoke)
    export TRITON_INTERPRET=1  # Triton's interpreter runs the kernels on CPU tensors
else
    gpu_env gpu.sh
    dev=cuda
    model=(--config fast-dvlm-3b)
    forward_grid=(--contexts 512,2048,8192 --batch-sizes 1,4,16)
    cost_grid=(--contexts 512,4096 --batch-sizes 1,2,4,8,16,32,64 --widths 1,2,4,8,16,32)
    pytest_mode=()
    kernels_mode=(--reps 20)
fi
if ! "$PY" -c "import torch, triton, transformers, safetensors" 2>/dev/null; then
    echo "gpu.sh: $PY needs torch, triton, transformers and safetensors" >&2
    exit 2
fi
repo=$PWD
out=${GPU_OUT:-benchmarks/results}
mkdir -p "$out"
out=$(cd "$out" && pwd)
if ! "$PY" -c "import fast_dvlm_sglang.benchmarks" 2>/dev/null; then
    # Not installed (a bare GPU machine): import this checkout through a folder of links laid out
    # as the installed package (kernels/, quantize/ and benchmarks/ are its subpackages), and run
    # from there: the checkout's own fast_dvlm_sglang/ (no kernels/ in it) must not come first.
    shim=$(mktemp -d)
    mkdir "$shim/fast_dvlm_sglang"
    for f in fast_dvlm_sglang/*; do ln -s "$PWD/$f" "$shim/fast_dvlm_sglang/"; done
    for d in kernels quantize benchmarks; do ln -s "$PWD/$d" "$shim/fast_dvlm_sglang/$d"; done
    export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
    cd "$shim"
fi
export PYTHONUNBUFFERED=1
gpu=$("$PY" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_').lower() if torch.cuda.is_available() else 'cpu')")
failed=()
deadline=$((SECONDS + ${GPU_BUDGET_S:-570}))

step() {  # step NAME SECONDS CMD...: CMD under min(SECONDS, what is left of the budget); rc 124: out of time
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    if [ $((deadline - SECONDS - 5)) -lt "$limit" ]; then limit=$((deadline - SECONDS - 5)); fi
    if [ "$limit" -lt 20 ]; then
        echo "== gpu.sh: $name skipped (the budget is spent)"
        failed+=("$name (no time left)")
        return 124
    fi
    echo "== gpu.sh: $name (limit ${limit}s)"
    timeout -k 10 "$limit" "$@"
    rc=$?
    echo "== gpu.sh: $name rc=$rc in $((SECONDS - start))s"
    [ "$rc" -eq 0 ] || failed+=("$name (rc $rc)")
    return "$rc"
}

attention=triton
gemm=triton
if "$PY" -c "import pytest, hypothesis" 2>/dev/null; then
    step attention-tests 75 "$PY" -m pytest -q -p no:cacheprovider "${pytest_mode[@]}" "$repo/tests/test_block_attention.py"
    [ $? -eq 1 ] && attention=sdpa  # tests failed (a timeout keeps the kernel: it says nothing of its results)
    step fp8-gemm-tests 45 "$PY" -m pytest -q -p no:cacheprovider "${pytest_mode[@]}" "$repo/tests/test_fp8_gemm.py"
    [ $? -eq 1 ] && gemm=scaled_mm
    step fp8-reference-tests 30 "$PY" -m pytest -q -p no:cacheprovider "${pytest_mode[@]}" "$repo/tests/test_fp8.py"
else
    failed+=("kernel tests (no pytest/hypothesis)")
fi
echo "== gpu.sh: timing with attention=$attention fp8_gemm=$gemm"
step forward 240 "$PY" -m fast_dvlm_sglang.cli bench forward "${model[@]}" --random-weights --precisions bf16,fp8 \
    "${forward_grid[@]}" --attention "$attention" --fp8-gemm "$gemm" --out "$out/bench_forward_${dev}_${model[1]}.json"
step cost-table 150 "$PY" -m fast_dvlm_sglang.cli bench cost-table "${model[@]}" --random-weights "${cost_grid[@]}" \
    --attention "$attention" --out "$out/forward_cost_${dev}_${model[1]}.json"
step kernels 600 "$PY" "$repo/benchmarks/kernels.py" "${kernels_mode[@]}" --out "$out/kernels_$gpu.json"
if [ ${#failed[@]} -gt 0 ]; then
    echo "gpu.sh: failed: ${failed[*]}" >&2
    exit 1
fi
echo "gpu.sh: every step passed"
