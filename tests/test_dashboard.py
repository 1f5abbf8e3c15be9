"""What a W&B dashboard of the default CPU recipe shows, read back from the offline run's own ``.wandb`` file
(tests/wandb_records.py), not through our logger calls: a quality curve, the per-σ chart at a bounded rate,
a handful of fixed σ bins instead of 95 scalars (the same keys for any σ list, in σ order as text), no fake zeros,
and the run config nested as in ``.hydra/config.yaml`` (filter by ``data.name``, ``model.net.ngf``)."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import run_entry
from lightning.pytorch.loggers import WandbLogger
from wandb_records import config, history, run_file, run_id

from ncsn.app.callbacks import SigmaLossChart
from ncsn.sigmas import SIGMA_BIN_PREFIX, geometric_sigmas, sigma_bin_key, sigma_bin_low

# the CPU recipe (95 levels, EMA, its logger: W&B offline), shortened: 3 validations, 2 sampling passes
SHORT_CPU = ["experiment=cpu", "trainer.max_time=null", "trainer.max_steps=60", "trainer.val_check_interval=20",
             "callbacks.sample_grid.every_n_steps=30", "callbacks.sample_grid.num_samples=16",
             "sampler.num_levels=3", "sampler.step_lr=1e-4", "callbacks.progress_bar=null"]


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("dashboard") / "run"
    result = run_entry("train.py", *SHORT_CPU, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir


def test_the_cpu_recipes_wandb_run_has_a_quality_curve_a_sigma_chart_and_no_fake_zeros(cpu_run):
    run_dir = cpu_run
    rows = history(run_file(run_dir))

    def steps_with(key):
        return [int(r["trainer/global_step"]) for r in rows if key in r]

    # the quality curve: the digit metric at both sampling passes, with its standard error, floors and class shares
    assert steps_with("quality/kid") == [30, 60]
    for row in (r for r in rows if "quality/kid" in r):
        assert row["quality/kid"] > row["quality/kid_std"] > 0 and 0 <= row["quality/degenerate"] <= 1
        assert abs(row["quality/fd"] / row["quality/fd_floor"] - row["quality/fd_ratio"]) < 1e-6
    assert len(steps_with("samples/grid/filenames")) == 2  # one sampling pass serves the grid and the metric
    # the per-σ chart at the first validation and at the end (bounded: not after every validation)
    assert steps_with("val/loss_vs_sigma_table/path") == [20, 60]
    # per-σ loss: the fixed σ bins of 15.77 -> 0.01, never a per-level key for 95 levels, no fake 0
    keys = {k for r in rows for k in r}
    assert not any(re.fullmatch(r"val/loss_(sigma|band)_\d+", k) for k in keys)
    assert {k for k in keys if k.startswith("val/loss_sigma")} == {
        sigma_bin_key(s) for s in geometric_sigmas(15.77, 0.01, 95).tolist()}
    for row in rows:
        for key, value in row.items():
            if key.startswith(("val/loss", "train/loss")) and isinstance(value, float):
                assert value > 0, (key, value)
    # the final value is in metrics.json, with the whole curve
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["quality"]["metric"] == "quality/kid"
    assert [h["step"] for h in record["quality"]["history"]] == [30, 60]
    assert record["metrics"]["quality/kid"] == record["quality"]["history"][-1]["quality/kid"]
    curve = record["per_sigma"]
    assert len(curve["sigma"]) == len(curve["loss"]) == 95 and sum(curve["count"]) == 64  # 2 batches of 32
    assert all((loss is None) == (count == 0) for loss, count in zip(curve["loss"], curve["count"]))


def test_the_sigma_bins_sort_as_text_from_the_smallest_sigma_to_the_largest(cpu_run):
    """W&B orders a section's panels by key text: 0.01-0.02 ... 1-2, 2-5, 5-10, 10-20 (not 1-2, 10-20, 2-5)."""
    keys = sorted({k for row in history(run_file(cpu_run)) for k in row if k.startswith(SIGMA_BIN_PREFIX)})
    assert len(keys) >= 10 and keys == sorted(keys, key=sigma_bin_low)
    lows = [sigma_bin_low(k) for k in keys]
    assert lows[0] == 0.01 and lows[-1] == 10.0 and 1.0 in lows and 2.0 in lows  # 15.77 -> 0.01


def _leaves(node, path=()):
    if isinstance(node, (dict, list)):
        for key, value in (node.items() if isinstance(node, dict) else enumerate(node)):
            yield from _leaves(value, (*path, key))
    else:
        yield path, node


def _at(node, path):
    for key in path:
        node = node[key]
    return node


def test_the_wandb_config_is_the_nested_run_config(cpu_run):
    """One nested config, the run's own: ``.hydra/config.yaml`` resolved (= ``checkpoints/config.yaml``), with no
    datamodule fields beside it at the top level (Lightning's save_hyperparameters used to add them, and the
    datamodule's ``seed`` overwrote the run's)."""
    logged = config(run_file(cpu_run))
    wandb_own = logged.pop("_wandb")  # W&B's own entry (its chart panels: val/loss_vs_sigma), hidden in its UI
    assert "val/loss_vs_sigma" in wandb_own.get("visualize", {})
    hydra_cfg = yaml.safe_load((cpu_run / ".hydra" / "config.yaml").read_text())
    assert logged == yaml.safe_load((cpu_run / "checkpoints" / "config.yaml").read_text())
    assert set(logged) == set(hydra_cfg)
    for path, value in _leaves(hydra_cfg):
        if isinstance(value, str) and "${" in value:  # an interpolation: resolved in the logged config
            _at(logged, path)
        elif path != ("callbacks", "best_checkpoint", "monitor"):  # 'auto', resolved to the run's quality key
            assert _at(logged, path) == value, path
    assert logged["callbacks"]["best_checkpoint"]["monitor"] == "quality/kid"
    assert logged["data"]["name"] == "mnist_bundled" and isinstance(logged["model"]["net"]["ngf"], int)
    assert logged["seed"] == hydra_cfg["seed"] and "batch_size" not in logged and "" not in logged
    # the checkpoint knows the W&B run to continue on a resume
    last = torch.load(cpu_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["wandb_run_id"] == run_id(run_file(cpu_run))


class ChartRecorder(WandbLogger):
    """A W&B logger (offline, never started) that records the steps it was given a per-σ chart at."""

    def __init__(self, save_dir):
        super().__init__(offline=True, save_dir=str(save_dir))
        self.chart_steps: list[int] = []

    def log_metrics(self, metrics, step=None):
        if "val/loss_vs_sigma" in metrics:
            self.chart_steps.append(step)


def test_the_sigma_chart_is_logged_at_a_bounded_rate_and_at_the_end(tmp_path):
    """mnist_paper validates every epoch (about 35 steps): over 200k steps that was about 5,700 W&B tables."""
    logger = ChartRecorder(tmp_path)
    chart = SigmaLossChart(max_lines=3, every_n_steps=10_000)
    trainer = SimpleNamespace(sanity_checking=False, loggers=[logger], global_step=0)
    module = SimpleNamespace(val_per_level=None)
    for step in range(35, 200_001, 35):
        trainer.global_step = step
        module.val_per_level = {"step": step, "sigma": [1.0, 0.1], "loss": [0.5, None], "count": [3, 0]}
        chart.on_validation_end(trainer, module)
        chart.on_validation_end(trainer, module)  # a second validation at the same step adds nothing
    chart.on_train_end(trainer, module)
    assert len(logger.chart_steps) == 21 and logger.chart_steps[0] == 35 and logger.chart_steps[-1] == 199_990
    assert all(b - a >= 10_000 for a, b in zip(logger.chart_steps[:-2], logger.chart_steps[1:-1]))
    assert [c["step"] for c in chart._curves] == logger.chart_steps[-3:]  # the last max_lines lines


def test_every_n_steps_0_charts_every_validation(tmp_path):
    logger = ChartRecorder(tmp_path)
    chart = SigmaLossChart(every_n_steps=0)
    trainer = SimpleNamespace(sanity_checking=False, loggers=[logger], global_step=0)
    for step in (10, 20, 30):
        trainer.global_step = step
        chart.on_validation_end(trainer, SimpleNamespace(val_per_level={"step": step, "sigma": [1.0], "loss": [0.5],
                                                                        "count": [1]}))
    chart.on_train_end(trainer, None)
    assert logger.chart_steps == [10, 20, 30]
