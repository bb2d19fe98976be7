#!/usr/bin/env bash
# GPU acceptance check, one command on a machine with an NVIDIA GPU, SGLang and this package:
#   benchmarks/gpu_smoke.sh [--models demo,random-3b] [--n 32] [...]   (flags: benchmarks/gpu_smoke.py --help)
# Serves the demo model (bfloat16) and a random-weights checkpoint with the real Fast-dVLM 3B shapes
# (built under /tmp on first use, ~7.5 GB), ar / mdm / spec, CUDA graphs on and off; checks spec == AR
# (tie-aware), ar graphs == eager, spec accepted lengths graphs == eager; prints a table, writes
# benchmarks/results/gpu_smoke_cuda.json and exits non-zero on a failure.
set -euo pipefail
. "$(dirname "$0")/gpu_env.sh"
gpu_env gpu_smoke
if ! "$PY" -c "import sglang.srt, fast_dvlm_sglang.server_parity, httpx" 2>/dev/null; then
    echo "gpu_smoke: $PY lacks SGLang or this package: make venv-sglang, or pip install -e '.[sglang,dev]'" >&2
    exit 2
fi
exec "$PY" benchmarks/gpu_smoke.py --device cuda "$@"
