#!/usr/bin/env bash
# The GPU check in one command (see bench/gpu_check.py), for a GPU machine whose python has torch, torchvision,
# lightning and torchmetrics but not hydra-core, omegaconf, wandb or mlxtend: those are installed from the
# project's wheel folder (../shared/wheels-gpu-py312, or $NCSN_GPU_WHEELS) into /tmp/ncsn-site, no index needed.
#   bash bench/gpu_check.sh OUT_DIR [--budget-seconds 300] [--num-samples 1000] [-- extra train.py overrides]
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh  # PY, PYTHONPATH (installs the wheels where needed)
exec "$PY" bench/gpu_check.py "$@"
