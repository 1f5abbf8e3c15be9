# Sourced by bench/gpu_check.sh and bench/gpu_speed.sh (from the repository root): sets PY and PYTHONPATH for a
# GPU machine whose python has torch, torchvision, lightning and torchmetrics but not hydra-core, omegaconf, wandb
# or mlxtend; those are installed from the project's wheel folder (../shared/wheels-gpu-py312, or
# $NCSN_GPU_WHEELS) into /tmp/ncsn-site, no index needed. $PYTHON picks the interpreter (default python3).
PY=${PYTHON:-python3}
WHEELS=${NCSN_GPU_WHEELS:-../shared/wheels-gpu-py312}
SITE=/tmp/ncsn-site
if ! "$PY" -c "import hydra, omegaconf, wandb, mlxtend" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
