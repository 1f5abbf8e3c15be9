"""Checkpoints written by earlier releases, whose stored run config names the modules before the split into the
core, ``ncsn.app`` and ``ncsn.tools`` (``_target_: ncsn.module.ScoreModel``, ``ncsn.ema.EMA``,
``ncsn.data.ToyDataModule``, ...), load, sample and resume: ``ncsn.moved`` maps the names, in one place.

The files (both ``checkpoints/last.ckpt`` of a 4-step toy run, EMA on, about 94 kB):

* ``tests/data/release_57e6228_toy_gmm.ckpt``: written by release 57e6228 (before safe loading), see
  tests/test_safe_loading.py;
* ``tests/data/release_4d7de46_toy_gmm.ckpt``: written by 4d7de46 (main before the split), with
    WANDB_MODE=offline NCSN_CPU_KERNELS=off python train.py experiment=toy_gmm model.net.hidden=32
      trainer.max_steps=4 data.n_train=512 data.n_val=256 logger=csv "callbacks.ema={_target_:ncsn.ema.EMA,decay:0.9}"
      callbacks.model_checkpoint.every_n_train_steps=2 callbacks.sample_grid.num_samples=200
      callbacks.sample_grid.every_n_steps=2
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import ROOT, run_entry
from hydra import compose, initialize_config_dir
from hydra.utils import get_object

from ncsn.app.checkpoints import load_checkpoint
from ncsn.app.sample import load_model, sample
from ncsn.moved import MOVED_MODULES, new_target, upgrade_targets

RELEASES = {
    "57e6228": ROOT / "tests" / "data" / "release_57e6228_toy_gmm.ckpt",
    "4d7de46": ROOT / "tests" / "data" / "release_4d7de46_toy_gmm.ckpt",
}
SAMPLE_FAST = ["num_samples=8", "batch_size=8", "sampler.n_steps_each=5", "progress=false"]


def stored_targets(path) -> list[str]:
    """The ``_target_`` strings as the file stores them (read raw, before the mapping)."""
    return targets_in(torch.load(path, map_location="cpu", weights_only=True)["ncsn_config"])


def targets_in(obj) -> list[str]:
    if isinstance(obj, dict):
        return [v for k, v in obj.items() if k == "_target_"] + [t for v in obj.values() for t in targets_in(v)]
    if isinstance(obj, list):
        return [t for v in obj for t in targets_in(v)]
    return []


@pytest.mark.parametrize("release", sorted(RELEASES))
def test_an_earlier_checkpoint_names_old_modules_and_loads_with_todays(release):
    path = RELEASES[release]
    old = stored_targets(path)
    assert "ncsn.module.ScoreModel" in old and "ncsn.data.ToyDataModule" in old  # what the mapping is for
    targets = targets_in(load_checkpoint(path)["ncsn_config"])
    assert len(targets) == len(old)
    for target in targets:
        assert target.rpartition(".")[0] not in MOVED_MODULES, target
        assert get_object(target) is not None, target  # every stored name builds today's object
    model, _ = load_model(path)
    assert type(model).__module__ == "ncsn.app.module"


@pytest.mark.parametrize("release", sorted(RELEASES))
def test_an_earlier_checkpoint_samples(release, tmp_path):
    out = tmp_path / "out"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("sample", overrides=[f"ckpt_path={RELEASES[release]}", f"paths.output_dir={out}",
                                           *SAMPLE_FAST])
    sample(cfg)
    points = np.load(out / "samples.npz")["samples"]
    assert points.shape == (8, 2) and np.isfinite(points).all()


def test_the_checkpoint_of_the_release_before_the_split_resumes_in_train_py(tmp_path):
    """(57e6228's resume: tests/test_safe_loading.py.)"""
    run = tmp_path / "run"
    result = run_entry("train.py", "experiment=toy_gmm", "model.net.hidden=32", "logger=none",
                       "callbacks.sample_grid=null", "callbacks.progress_bar=null",
                       "callbacks.ema={_target_:ncsn.app.ema.EMA,decay:0.9}", "trainer.max_steps=6",
                       f"ckpt_path={RELEASES['4d7de46']}", f"hydra.run.dir={run}")
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((run / "metrics.json").read_text())
    assert (record["global_step"], record["train_steps"]) == (6, 2)  # continued at step 4, as saved
    resumed = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert resumed["ncsn_config"]["model"]["_target_"] == "ncsn.app.module.ScoreModel"  # carried on as today's


def test_new_target_maps_every_old_target_of_the_earlier_releases():
    old = {
        "ncsn.module.ScoreModel": "ncsn.app.module.ScoreModel",
        "ncsn.ema.EMA": "ncsn.app.ema.EMA",
        "ncsn.checkpoints.FinalStepCheckpoint": "ncsn.app.checkpoints.FinalStepCheckpoint",
        "ncsn.best_checkpoint.BestQualityCheckpoint": "ncsn.app.best_checkpoint.BestQualityCheckpoint",
        "ncsn.progress.StepProgressBar": "ncsn.app.progress.StepProgressBar",
        "ncsn.callbacks.SampleGridCallback": "ncsn.app.callbacks.SampleGridCallback",
        "ncsn.callbacks.SigmaLossChart": "ncsn.app.callbacks.SigmaLossChart",
        "ncsn.data.ToyDataModule": "ncsn.app.datamodules.ToyDataModule",
        "ncsn.data.ImageDataModule": "ncsn.app.datamodules.ImageDataModule",
        "ncsn.app.wandb_logger": "ncsn.app.common.wandb_logger",
        "ncsn.sweeps.resolve_optimized_metric": "ncsn.app.sweeps.resolve_optimized_metric",
        "ncsn.metrics.FIDCallback": "ncsn.app.fid_callback.FIDCallback",
        "ncsn.sigmas.geometric_sigmas": "ncsn.sigmas.geometric_sigmas",  # not moved
        "ncsn.nets.ToyScoreMLP": "ncsn.nets.ToyScoreMLP",
        "ncsn.metrics.SmallFeatureNet": "ncsn.metrics.SmallFeatureNet",
    }
    for before, after in old.items():
        assert new_target(before) == after
        assert get_object(after) is not None
    assert new_target("ncsn.app.common.wandb_logger") == "ncsn.app.common.wandb_logger"  # new names stay
    cfg = {"model": {"_target_": "ncsn.module.ScoreModel", "net": {"_target_": "ncsn.nets.NCSN"}},
           "callbacks": [{"_target_": "ncsn.ema.EMA"}], "note": "ncsn.module.ScoreModel"}
    assert targets_in(upgrade_targets(cfg)) == ["ncsn.app.module.ScoreModel", "ncsn.nets.NCSN", "ncsn.app.ema.EMA"]
    assert cfg["note"] == "ncsn.module.ScoreModel"  # only _target_ values are names to build
