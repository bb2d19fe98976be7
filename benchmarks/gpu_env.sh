# Sourced by the GPU scripts (gpu.sh, gpu_smoke.sh): `gpu_env NAME [--no-gpu]` goes to the repo
# root, sets PY (PYTHON, else .venv-sglang's python, else python3) and, unless --no-gpu (a CPU dry
# run), exits 2 with one line if no NVIDIA GPU is visible.
gpu_env() {
    cd "$(dirname "${BASH_SOURCE[0]}")/.."
    PY=${PYTHON:-}
    if [ -z "$PY" ]; then
        if [ -x .venv-sglang/bin/python ]; then PY=.venv-sglang/bin/python; else PY=python3; fi
    fi
    [ "${2:-}" = "--no-gpu" ] && return 0
    if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
        echo "$1: no NVIDIA GPU visible (nvidia-smi)" >&2
        exit 2
    fi
}
