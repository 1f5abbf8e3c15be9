"""``checkpoints/best.ckpt`` and the quality record in ``metrics.json`` (ncsn.app.best_checkpoint, the sample grid):
the checkpoint monitors the key the sample grid's metric logs (one source: ``ncsn.app.sweeps.run_quality_key``), a
monitor no pass logs is said once instead of silently never saving, and a resumed run keeps the earlier passes
(their history travels in the checkpoint) and finishes without a pass of its own."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, TINY
from fakes import fake_inception_weights, write_cifar
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from ncsn.app import train as training
from ncsn.app.common import instantiate
from ncsn.metrics import inception_available

# passes at steps 2 and 4 (and none at the end: it is step 4's)
TWO_PASSES = [*TINY, "logger=none", "callbacks.sample_grid.every_n_steps=2"]


def compose_train(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    GlobalHydra.instance().clear()
    return cfg


def train(out_dir: Path, *overrides: str) -> dict:
    """``ncsn.app.train.train`` in this process; returns the run's metrics.json."""
    cfg = compose_train(*TWO_PASSES, *overrides, f"paths.output_dir={out_dir}")
    training.train(cfg)
    return json.loads((out_dir / "metrics.json").read_text())


@pytest.mark.skipif(not inception_available(), reason="torch-fidelity is not installed")
@pytest.mark.parametrize("where", ["callbacks.sample_grid.inception_weights", "paths.inception_weights"])
def test_the_best_checkpoint_monitors_the_key_the_sample_grid_logs(where, tmp_path, monkeypatch):
    """Inception weights given to the sample grid directly made the pass log quality/kid while best.ckpt (and
    optimized_metric=auto) waited for quality/kid_pixels, the key of paths.inception_weights (unset)."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # no cached Inception weights
    weights = tmp_path / "inception.pth"
    fake_inception_weights(weights, monkeypatch)
    write_cifar(tmp_path, per_batch=4, n_test=6)
    cfg = compose_train("data=cifar10", f"paths.data_dir={tmp_path}", "data.verify_checksums=false",
                        f"paths.output_dir={tmp_path / 'run'}", "callbacks.sample_grid.num_samples=4",
                        f"{where}={weights}", "callbacks.sample_grid.inception_weights=null"
                        if where == "paths.inception_weights" else "paths.inception_weights=null")
    training.resolve_quality_monitors(cfg)
    grid = instantiate(cfg.callbacks.sample_grid)
    metric = grid.quality_metric(SimpleNamespace(datamodule=instantiate(cfg.data)),
                                 SimpleNamespace(device=torch.device("cpu")))
    # set on the sample grid: Inception KID; set only in paths with the grid's own setting cleared: pixels
    assert metric.name == ("quality/kid_inception" if where.startswith("callbacks") else "quality/kid_pixels")
    assert cfg.callbacks.best_checkpoint.monitor == metric.name
    assert training.resolve_optimized_metric(cfg) == metric.name


def test_a_monitor_no_pass_logs_is_said_once_and_writes_no_best_checkpoint(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="ncsn")
    record = train(tmp_path, "callbacks.best_checkpoint.monitor=quality/energy_distance")
    assert [h["step"] for h in record["quality"]["history"]] == [2, 4]  # two passes, both logged quality/kid
    lines = [r.getMessage() for r in caplog.records if "best.ckpt is not written" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "quality/energy_distance" in lines[0] and "quality/kid" in lines[0] and "step 2" in lines[0]
    assert record["best_checkpoint"] is None and not (tmp_path / "checkpoints" / "best.ckpt").exists()


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> Path:
    """4 steps with quality passes at steps 2 and 4; best.ckpt, last.ckpt."""
    out = tmp_path_factory.mktemp("best") / "first"
    record = train(out)
    assert [h["step"] for h in record["quality"]["history"]] == [2, 4]
    assert record["best_checkpoint"]["step"] in (2, 4) and (out / "checkpoints" / "best.ckpt").is_file()
    return out


def test_a_resumed_run_keeps_the_earlier_passes_in_metrics_json(first_run, tmp_path):
    first = json.loads((first_run / "metrics.json").read_text())
    record = train(tmp_path, "trainer.max_steps=6", f"ckpt_path={first_run / 'checkpoints' / 'last.ckpt'}")
    history = record["quality"]["history"]
    assert [h["step"] for h in history] == [2, 4, 6]
    assert history[:2] == first["quality"]["history"]  # the earlier passes, as they were
    assert record["quality"]["metric"] == "quality/kid" and record["global_step"] == 6


def test_a_resume_with_no_pass_of_its_own_finishes_and_keeps_the_record(first_run, tmp_path):
    """Resumed into another output dir at its last step: no step, no pass (the end pass of step 4 was made), and
    Lightning keeps the earlier best.ckpt's path but not its score."""
    first = json.loads((first_run / "metrics.json").read_text())
    record = train(tmp_path, f"ckpt_path={first_run / 'checkpoints' / 'last.ckpt'}")
    assert record["global_step"] == 4 and record["quality"] == first["quality"]
    assert not (tmp_path / "samples").exists()  # no pass repeated at step 4
    best = record["best_checkpoint"]
    assert best["path"] == first["best_checkpoint"]["path"] and best["step"] == first["best_checkpoint"]["step"]
    assert best["value"] is None
