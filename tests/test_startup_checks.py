"""A run checks every file it will read before its first step (``ncsn.app.train.check_run_files``): a wrong path ends
``train.py`` at the start with one line that names the setting, a non-zero exit and no step taken, instead of after
the first 5,000 steps (the Inception weights were only opened at the first quality pass)."""

from __future__ import annotations

import pytest
from conftest import TINY, run_entry
from fakes import write_cifar

from ncsn.metrics import inception_available

# TINY on the CIFAR-10 format (tests/fakes.py), with a quality pass that reads the Inception weights
CIFAR = [*TINY, "data=cifar10", "data.verify_checksums=false", "data.num_workers=0", "data.pin_memory=false",
         "logger=none"]


def assert_stopped_at_the_start(result, run_dir, setting: str) -> str:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and f"{setting}=" in line and "Traceback" not in result.stderr
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.json").exists()
    assert not (run_dir / "samples").exists() and "Epoch 0" not in result.stdout  # no step taken
    return line


@pytest.mark.skipif(not inception_available(), reason="torch-fidelity is not installed")
def test_a_missing_inception_weights_file_stops_the_run_before_its_first_step(tmp_path):
    write_cifar(tmp_path / "data", per_batch=8, n_test=6)
    run_dir = tmp_path / "run"
    missing = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    result = run_entry("train.py", *CIFAR, f"paths.data_dir={tmp_path / 'data'}",
                       f"paths.inception_weights={missing}", f"hydra.run.dir={run_dir}")
    line = assert_stopped_at_the_start(result, run_dir, "paths.inception_weights")
    assert str(missing) in line and "no such file" in line


def test_missing_data_files_stop_the_run_naming_paths_data_dir(tmp_path):
    run_dir = tmp_path / "run"
    result = run_entry("train.py", *CIFAR, f"paths.data_dir={tmp_path / 'nowhere'}", f"hydra.run.dir={run_dir}")
    line = assert_stopped_at_the_start(result, run_dir, "paths.data_dir")
    assert "CIFAR-10 not found" in line and str(tmp_path / "nowhere") in line
