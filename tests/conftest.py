"""Shared fixtures: running the real entry points, and one tiny trained run reused by several tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# The test networks are tiny: one thread is as fast as two, and it avoids OpenMP threads spinning against
# the train.py / sample.py processes the tests start (seen here: 7-50x slowdowns on a busy 2-core machine).
torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))  # tests/fakes.py
# No CPU kernel calibration (ncsn.app.cpu_kernels: about 20 s) in the train.py / sample.py processes the tests start;
# tests/test_cpu_kernels.py turns it on where it is the subject.
os.environ["NCSN_CPU_KERNELS"] = "off"


def compose_train(*overrides: str):
    """``conf/train.yaml`` composed with ``overrides`` (as train.py would, without running it)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=["paths.output_dir=/tmp/unused", *overrides])


def run_entry(script: str, *overrides: str, timeout: int = 600, env: dict | None = None,
              cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``python train.py|sample.py overrides...`` as a user would (offline W&B)."""
    full_env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0",
                "OMP_NUM_THREADS": "1"}
    full_env.pop("HYDRA_FULL_ERROR")
    full_env.update(env or {})
    return subprocess.run([sys.executable, str(ROOT / script), *overrides], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd or ROOT, check=False)


# Overrides that make a run tiny: NCSN with ngf 8 on the bundled digits, 4 steps, checkpoints every 2.
TINY = ["experiment=mnist_paper", "debug=smoke", "model.net.ngf=8", "data.batch_size=16"]
EMA_ON = "callbacks.ema={_target_:ncsn.app.ema.EMA,decay:0.9}"


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """One real ``train.py`` run (offline W&B, EMA on) shared by the training and sampling tests."""
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    result = run_entry("train.py", *TINY, EMA_ON, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir
