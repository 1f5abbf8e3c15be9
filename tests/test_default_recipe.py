"""``python train.py`` picks the recipe for the machine: the GPU recipe where CUDA is visible, the CPU recipe
otherwise, saying which in one line; an explicit experiment always wins. And the CPU recipe, shortened,
really learns and samples digits-like images (slow)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from conftest import ROOT, run_entry

from ncsn.app.command_line import CPU_EXPERIMENT, GPU_EXPERIMENT, choose_experiment

sys.path.insert(0, str(ROOT / "bench"))


def test_no_experiment_on_a_gpu_machine_runs_the_gpu_recipe_and_says_so():
    argv, line = choose_experiment(["logger=csv"], cuda_available=True, gpu_name="NVIDIA H100")
    assert argv == ["logger=csv", f"experiment={GPU_EXPERIMENT}"]
    assert "CUDA GPU is visible (NVIDIA H100)" in line and f"experiment={GPU_EXPERIMENT}" in line


def test_no_experiment_without_a_gpu_runs_the_cpu_recipe_and_says_what_and_how_long():
    argv, line = choose_experiment([], cuda_available=False)
    assert argv == [f"experiment={CPU_EXPERIMENT}"]
    assert "no CUDA GPU found" in line and "10 minutes" in line and f"experiment={GPU_EXPERIMENT}" in line
    assert "\n" not in line


@pytest.mark.parametrize("given", ["experiment=quick", "+experiment=quick", "experiment=mnist_paper,quick"])
def test_an_explicit_experiment_always_wins(given):
    for cuda in (True, False):
        argv, line = choose_experiment(["-m", given], cuda_available=cuda)
        assert argv == ["-m", given] and line is None


@pytest.mark.parametrize("cpu_arg", ["trainer=cpu", "trainer.accelerator=cpu"])
def test_a_gpu_machine_told_to_train_on_the_cpu_gets_the_cpu_recipe(cpu_arg):
    argv, line = choose_experiment([cpu_arg], cuda_available=True, gpu_name="NVIDIA H100")
    assert argv == [cpu_arg, f"experiment={CPU_EXPERIMENT}"]
    assert f"{cpu_arg} puts training on the CPU: running experiment={CPU_EXPERIMENT}" in line


@pytest.mark.parametrize("cuda", [True, False])
def test_removing_the_experiment_runs_without_one_and_says_nothing_else(cuda):
    argv, line = choose_experiment(["~experiment"], cuda_available=cuda)
    assert argv == ["~experiment"] and line is None


def test_train_py_without_experiment_runs_the_cpu_recipe_here(tmp_path):
    run_dir = tmp_path / "run"
    result = run_entry("train.py", "debug=fast_dev_run", "logger=none", "callbacks.progress_bar=null",
                       f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "no CUDA GPU found: running experiment=cpu" in result.stderr
    overrides = (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert "experiment=cpu" in overrides
    config = (run_dir / ".hydra" / "config.yaml").read_text()
    assert "run_name: cpu" in config


# The CPU recipe shortened to SHORT_STEPS steps (a step count, not the recipe's wall-clock limit, so the result
# does not depend on how busy the machine is): seeded on the CPU, the same steps give the same network up to
# thread-order rounding. What it checks is robust on a busy shared machine: the held-out loss against the
# zero-output loss (0.139 measured, bound 0.2; a collapsed or untrained network sits at 1.0) and the share of
# degenerate samples from a fixed seed (4.7 % measured, bound 25 %; an untrained network gives 100 %), not
# timings or the Fréchet distance of 64 samples (too noisy at this count).
SHORT_STEPS = 400


@pytest.mark.slow
def test_cpu_recipe_shortened_learns_and_its_samples_are_not_degenerate(tmp_path):
    from quality import degenerate_mask

    run_dir = tmp_path / "cpu"
    result = run_entry("train.py", "experiment=cpu", f"trainer.max_steps={SHORT_STEPS}", "trainer.max_time=null",
                       "logger=csv", "callbacks.progress_bar=null", "callbacks.sample_grid=null",
                       f"hydra.run.dir={run_dir}", env={"OMP_NUM_THREADS": "2"}, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["global_step"] == SHORT_STEPS
    assert record["warnings"] == []
    m = record["metrics"]
    # the recipe's network is preconditioned (EDM): its references are the network with its body at zero (the
    # score of a Gaussian), a harder baseline than a zero score; measured 0.266 at 400 steps (1.0 at a collapse),
    # the body's output mean square 0.386 (0 at a collapse)
    assert m["val/loss_to_zero_output"] < 0.4, m
    assert m["val/output_ms"] > 0.2, m

    out = tmp_path / "samples"
    result = run_entry("sample.py", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "num_samples=64",
                       "batch_size=64", "seed=0", "progress=false", f"hydra.run.dir={out}",
                       env={"OMP_NUM_THREADS": "2"}, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with np.load(out / "samples.npz") as f:
        samples = f["samples"]
    assert samples.shape == (64, 28, 28, 1)
    degenerate = float(degenerate_mask(samples).mean())
    assert degenerate < 0.25, f"{degenerate:.0%} of 64 samples are degenerate"  # measured 4.7 % (3 of 64)


@pytest.mark.parametrize("argv, expected", [
    (["--cfg", "job"], ["experiment=cpu", "--cfg", "job"]),
    (["-m", "hparams_search=cpu_recipe", "--cfg", "hydra"], ["-m", "hparams_search=cpu_recipe", "experiment=cpu",
                                                             "--cfg", "hydra"]),
])
def test_the_picked_experiment_joins_the_other_overrides_so_hydra_options_after_them_still_parse(argv, expected):
    # Hydra parses the overrides as one run of positional arguments: appended after `--cfg job` it was rejected
    assert choose_experiment(argv, cuda_available=False)[0] == expected
