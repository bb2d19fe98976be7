#!/usr/bin/env bash
# Model-level forward benchmark on a GPU machine, one command, within 10 minutes:
#   benchmarks/gpu.sh [more `fast-dvlm bench forward` flags]
# Needs PyTorch, Triton and transformers (the lent GPU machines have them; SGLang and a network are
# not needed). Times an AR step, a draft block and a verify block of the reference on the real
# Fast-dVLM 3B configuration with random weights, bf16 and FP8, under CUDA graphs, next to
# transformers' eager generate and the copy-bandwidth roofline; writes
# benchmarks/results/bench_forward_cuda_fast-dvlm-3b.{json,md,png}.
set -euo pipefail
. "$(dirname "$0")/gpu_env.sh"
gpu_env gpu.sh
if ! "$PY" -c "import torch, triton, transformers, safetensors" 2>/dev/null; then
    echo "gpu.sh: $PY needs torch, triton, transformers and safetensors" >&2
    exit 2
fi
if ! "$PY" -c "import fast_dvlm_sglang.benchmarks" 2>/dev/null; then
    # Not installed (a bare GPU machine): import this checkout through a folder of links laid out
    # as the installed package (kernels/, quantize/ and benchmarks/ are its subpackages).
    shim=$(mktemp -d)
    mkdir "$shim/fast_dvlm_sglang"
    for f in fast_dvlm_sglang/*; do ln -s "$PWD/$f" "$shim/fast_dvlm_sglang/"; done
    for d in kernels quantize benchmarks; do ln -s "$PWD/$d" "$shim/fast_dvlm_sglang/$d"; done
    export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PY" -m fast_dvlm_sglang.cli bench forward --config fast-dvlm-3b --random-weights --precisions bf16,fp8 \
    --contexts 512,2048,8192 --batch-sizes 1,4,16 "$@"
