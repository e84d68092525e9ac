#!/usr/bin/env bash
# One command for a fresh machine: torch for this device, then the harness and everything it needs.
#   bash scripts/setup.sh          # CUDA build if `nvidia-smi` sees a GPU, else the CPU build
#   bash scripts/setup.sh cpu      # the CPU build (torch 2.13.0; what .ci/run uses)
#   bash scripts/setup.sh cuda     # torch's default PyPI wheel (a CUDA build on Linux x86_64), or TORCH_INDEX_URL
# torch comes first so that requirements.txt's `torch>=2.4` installs nothing more.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:-auto}
if [[ "$target" == auto ]]; then
    target=cpu
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && target=cuda
fi
case "$target" in
    cpu)  pip install --quiet torch==2.13.0 ;;
    cuda) pip install --quiet "torch>=2.9" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} ;;
    *)    echo "error: unknown target '$target' (choose cpu or cuda)" >&2; exit 2 ;;
esac
pip install --quiet -r requirements.txt
pip install --quiet --no-deps -e .
python -c "import torch, apollo; print(f'torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}; '
           f'optimizers: {\", \".join(apollo.optimizer_names())}')"
