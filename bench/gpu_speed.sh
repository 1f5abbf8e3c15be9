#!/usr/bin/env bash
# GPU speed measurements in one command: bench/speed.py for all three networks and a torch.profiler breakdown of
# one Langevin step (bench/profile_step.py), for a GPU machine whose python has torch, torchvision, lightning and
# torchmetrics but not hydra-core, omegaconf, wandb or mlxtend: those are installed from the project's wheel
# folder (../shared/wheels-gpu-py312, or $NCSN_GPU_WHEELS) into /tmp/ncsn-site, no index needed (as gpu_check.sh).
#
#   bash bench/gpu_speed.sh OUT_DIR [BUDGET_SECONDS]        # default budget 450 s (7.5 min), all stages together
#
# Expected time on one H100/H200: about 7.5 minutes, and never more than BUDGET_SECONDS (+ ~15 s to stop a stage
# and merge): every stage runs under `timeout` with what is left of the budget, and speed.py rewrites its JSON
# after each measured row, so a stage cut short keeps the rows it finished. The time goes mostly to
# torch.compile: each (network, training or sampling, batch size) compiles once, about 30-90 s cold (earlier
# H200 runs: fast-path warm-up 62 s for the MNIST net's sampling at batch 100, 75 s for the CIFAR-10 net's at
# batch 1,000); the timed work is small (50 Langevin steps per sampling row, 20 training steps per training row:
# the baseline's 50 steps at batch 1,000 take ~16 s, its warm-up one level). Stages, most wanted first:
#   1. speed.py --nets cifar10_ncsnv2 (training @128, sampling @1000; new rows)   ~3 min    -> speed_ncsnv2.*
#   2. profile_step.py, paper CIFAR-10 NCSN, batch 1000 and 100, fast path          ~2 min    -> profile.*
#   3. speed.py --nets cifar10,mnist --tasks sample --sample-batches 1000          ~1.5 min  -> speed_sample.*
#      (the CIFAR-10 batch-1000 kernels come from stage 2 through the compile cache)
#   4. speed.py --nets cifar10,mnist --tasks train                                  what is left -> speed_train.*
#   then OUT_DIR/speed.json: the rows of every speed_*.json together, and summary.txt (also printed).
# Compiled kernels are cached in ~/.cache/ncsn/inductor (ncsn.perf.enable_compile_cache): rerunning the command on
# the same (still warm) machine skips most of the compiling, so rows cut by the budget fit on a second run.
# CPU smoke run of this script (sizes that say nothing about a GPU):
#   PYTHON=.venv/bin/python NCSN_SPEED_EXTRA="--tiny --sample-batches 4" NCSN_PROFILE_EXTRA=--tiny \
#     bash bench/gpu_speed.sh /tmp/gpu_speed_smoke 300
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash bench/gpu_speed.sh OUT_DIR [BUDGET_SECONDS]}
BUDGET=${2:-${NCSN_SPEED_BUDGET_S:-450}}
mkdir -p "$OUT"
source bench/gpu_env.sh  # PY, PYTHONPATH (installs the wheels where needed)
read -r -a SPEED_EXTRA <<< "${NCSN_SPEED_EXTRA:-}"      # appended to every speed.py command (last one wins)
read -r -a PROFILE_EXTRA <<< "${NCSN_PROFILE_EXTRA:-}"

STATUS=()
FAILED=0
stage() {  # stage NAME MIN_SECONDS CAP_SECONDS command...: run with min(CAP, what is left), skip under MIN
  local name=$1 min=$2 cap=$3; shift 3
  local left=$((BUDGET - SECONDS))
  local limit=$((left < cap ? left : cap))
  if ((limit < min)); then
    STATUS+=("$name: skipped (${left} s of the budget left)"); echo "== $name: skipped, ${left} s left"; return
  fi
  echo "== $name (limit ${limit} s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=$?
  if ((rc == 0)); then STATUS+=("$name: done in $((SECONDS - t0)) s")
  elif ((rc == 124 || rc == 137)); then STATUS+=("$name: cut at ${limit} s by the budget (rows so far kept)")
  else STATUS+=("$name: FAILED (exit $rc), see $name.log"); FAILED=1; fi
}

"$PY" -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO GPU')"
stage speed_ncsnv2 60 240 "$PY" bench/speed.py --nets cifar10_ncsnv2 --json "$OUT/speed_ncsnv2.json" \
  "${SPEED_EXTRA[@]}"
# profile_step.py's defaults: the paper CIFAR-10 network, batches 1000 then 100, fast path with torch.compile
stage profile 60 170 "$PY" bench/profile_step.py --json "$OUT/profile.json" "${PROFILE_EXTRA[@]}"
stage speed_sample 45 150 "$PY" bench/speed.py --nets cifar10,mnist --tasks sample --sample-batches 1000 \
  --json "$OUT/speed_sample.json" "${SPEED_EXTRA[@]}"
stage speed_train 45 600 "$PY" bench/speed.py --nets cifar10,mnist --tasks train --json "$OUT/speed_train.json" \
  "${SPEED_EXTRA[@]}"

{
  echo "gpu_speed.sh: ${SECONDS} s of a ${BUDGET} s budget"
  printf '%s\n' "${STATUS[@]}"
  "$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
metas, rows = [], []
for name in ("speed_ncsnv2", "speed_sample", "speed_train"):
    path = out / f"{name}.json"
    if path.exists():
        data = json.loads(path.read_text())
        metas.append({"stage": name, **data["meta"]})
        rows += data["results"]
(out / "speed.json").write_text(json.dumps({"meta": metas, "results": rows}, indent=2) + "\n")
print(f"\n{len(rows)} speed rows -> {out / 'speed.json'}")
print("| net | task | batch | baseline img/s | fast img/s | fast/baseline | fast warm-up s | evals/image |")
print("|---|---|---:|---:|---:|---:|---:|---:|")
for r in rows:
    b, f = r["baseline"], r["fast"]
    print(f"| {r['net']} | {r['task']} | {r['batch']} | {b['images_per_s']:.4g} | {f['images_per_s']:.4g} | "
          f"{r['ratio']:.2f}x | {f['warmup_s']:.1f} | {f.get('extrapolated_to_evals', '')} |")
EOF
} 2>&1 | tee "$OUT/summary.txt"
exit $FAILED
