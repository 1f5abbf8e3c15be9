#!/usr/bin/env bash
# The GPU lane's first call in one command (issue 27, steps 1-2): the GPU check of the default recipe
# (bench/gpu_check.sh: 5 GPU-minutes of `train.py`, 1,000 samples, verdict), then the sampler benchmark
# (bench/samplers.py) on the checkpoint it trained, cut to what is left of TOTAL_SECONDS (rows are written as they
# finish). Leaves at most 8 files in OUT_DIR (the device tool's limit): check/{verdict.txt, curves.png,
# samples.png, metrics.json}, samplers/{samplers.md, samplers.png}, logs.tgz (the rest).
#
#   NCSN_GPU_WHEELS=.gpu-wheels bash bench/gpu_lane.sh OUT_DIR [TOTAL_SECONDS=560] [CHECK_BUDGET=300] [N=1000]
# CPU smoke run of the script (sizes that say nothing about a GPU):
#   PYTHON=.venv/bin/python NCSN_LANE_EXTRA="model.net.ngf=8 data.batch_size=16" bash bench/gpu_lane.sh /tmp/lane 300 40 16
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:?usage: bash bench/gpu_lane.sh OUT_DIR [TOTAL_SECONDS] [CHECK_BUDGET] [N]}")
TOTAL=${2:-560}
BUDGET=${3:-300}
N=${4:-1000}
read -r -a EXTRA <<< "${NCSN_LANE_EXTRA:-}"
# ald T = 5 (NCSNv2 technique 4; mnist's sampler until issue 25), cas T = 2 (its sampler now), pc with one
# corrector, cas T = 1, and ald at T = 2 (technique-4 step)
GRID=${NCSN_LANE_GRID:-"ald:n_steps_each=5,step_lr=1.11e-5,denoise=true;cas:n_steps_each=2,step_lr=2e-5,denoise=true;pc:n_corrector=1,snr=0.16,denoise=true;cas:n_steps_each=1,step_lr=2e-5,denoise=true;ald:n_steps_each=2,step_lr=1.3466e-5,denoise=true"}
mkdir -p "$OUT"
bash bench/gpu_check.sh "$OUT/check" --budget-seconds "$BUDGET" --num-samples "$N" -- "${EXTRA[@]}"
CHECK_RC=$?
source bench/gpu_env.sh
CKPT=$(ls -t bench/.runs/gpu_check_*/checkpoints/last.ckpt 2>/dev/null | head -1)
if [ -n "$CKPT" ] && [ $((TOTAL - SECONDS)) -gt 20 ]; then
  timeout $((TOTAL - SECONDS)) "$PY" bench/samplers.py "$CKPT" --num-samples "$N" --batch-size "$N" \
    --out "$OUT/samplers" --grid "$GRID"
  echo "samplers.py exit $? (124: cut at the time limit; the rows it finished are in samplers.md)"
else
  echo "no sampler benchmark: no checkpoint or no time left (${SECONDS} s of ${TOTAL} s used)"
fi
(cd "$OUT" && tar czf logs.tgz --ignore-failed-read check/metrics.csv check/train.log check/sample.log \
  check/quality.json samplers/samplers.csv 2>/dev/null; rm -f check/metrics.csv check/train.log check/sample.log \
  check/quality.json samplers/samplers.csv)
echo "gpu_lane: ${SECONDS} s; gpu_check exit ${CHECK_RC}"
exit "$CHECK_RC"
