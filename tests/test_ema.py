"""ncsn.app.ema.EMA, the EMA callback: raw weights kept after fit, used by sample.py use_ema=false and by a resume;
raw weights for validation, the sample grid and checkpoints before the EMA starts.

Three tiny real runs of 3 steps, same seed: EMA off, EMA on (decay 0.9, from the first step) and EMA starting
at step 1000 (never, here). 3 steps with checkpoints every 2 means last.ckpt is written after fit ends (by
ncsn.app.checkpoints.FinalStepCheckpoint, a ModelCheckpoint: Lightning runs it last), i.e. after the other callbacks'
on_train_end.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import EMA_ON, ROOT, TINY, run_entry
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import WeightAveraging
from omegaconf import OmegaConf

from ncsn.app import train as training
from ncsn.app.common import instantiate, instantiate_group
from ncsn.app.ema import EMA
from ncsn.app.lightning_private import average_model
from ncsn.app.sample import generate, sample, to_uint8_hwc

THREE_STEPS = [*TINY, "trainer.max_steps=3", "logger=none"]
EMA_LATE = EMA_ON.replace("}", ",update_starting_at_step:1000}")
SAMPLE = ["sampler.n_steps_each=2", "progress=false", "num_samples=4", "batch_size=4", "seed=3"]


def train_run(run_dir: Path, *overrides: str) -> Path:
    result = run_entry("train.py", *THREE_STEPS, *overrides, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name, value in a.items():
        assert torch.equal(value, b[name]), name


def differs(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[name], b[name]) for name in a)


@pytest.fixture(scope="module")
def off_run(tmp_path_factory) -> Path:
    return train_run(tmp_path_factory.mktemp("ema") / "off", "callbacks.ema=null")


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory) -> Path:
    return train_run(tmp_path_factory.mktemp("ema") / "on", EMA_ON)


@pytest.fixture(scope="module")
def late_run(tmp_path_factory) -> Path:
    return train_run(tmp_path_factory.mktemp("ema") / "late", EMA_LATE)


def test_default_config_uses_the_projects_ema():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["paths.output_dir=/tmp/unused", "experiment=mnist"])
    ema = [c for c in instantiate_group(cfg.callbacks) if isinstance(c, EMA)]
    assert len(ema) == 1 and ema[0].update_starting_at_step == cfg.callbacks.ema.update_starting_at_step


def test_last_ckpt_after_fit_keeps_raw_weights_as_current_model_state(ema_run, off_run):
    ckpt = load(ema_run / "checkpoints" / "last.ckpt")
    raw = load(off_run / "checkpoints" / "last.ckpt")["state_dict"]
    assert ckpt["global_step"] == 3  # written after fit, not at a periodic save
    assert int(ckpt["averaging_state"]["n_averaged"]) == 3
    # same seed, EMA on or off: the same raw weights (validation swapped the EMA in and back out)
    assert_same_weights(ckpt["current_model_state"], raw)
    assert differs(ckpt["state_dict"], ckpt["current_model_state"]), "state_dict must hold the EMA weights"


def test_sample_app_uses_raw_weights_only_with_use_ema_false(ema_run, tmp_path):
    last = ema_run / "checkpoints" / "last.ckpt"

    def via_sample_py(out: Path, *overrides: str) -> np.ndarray:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("sample", overrides=[f"ckpt_path={last}", f"paths.output_dir={out}", *SAMPLE, *overrides])
        return np.load(sample(cfg)["array"])["samples"]

    def from_weights(key: str) -> np.ndarray:
        ckpt = load(last)
        model = instantiate(OmegaConf.create(ckpt["ncsn_config"]).model)
        model.load_state_dict(ckpt[key])
        return to_uint8_hwc(generate(model.eval(), 4, 4, 3, {"n_steps_each": 2}, progress=False))

    ema = via_sample_py(tmp_path / "ema")
    raw = via_sample_py(tmp_path / "raw", "use_ema=false")
    assert not np.array_equal(ema, raw)
    assert np.array_equal(raw, from_weights("current_model_state"))
    assert np.array_equal(ema, from_weights("state_dict"))


def test_resume_continues_from_raw_weights_with_the_ema_state(ema_run, off_run, tmp_path, monkeypatch):
    last = ema_run / "checkpoints" / "last.ckpt"
    saved = load(last)
    raw = load(off_run / "checkpoints" / "last.ckpt")["state_dict"]
    seen: dict = {}

    class Probe(L.Callback):
        """Records the module, the average and n_averaged when training (re)starts, after the restore."""

        def on_train_start(self, trainer, pl_module):
            average = average_model(next(c for c in trainer.callbacks if isinstance(c, WeightAveraging)))
            seen["module"] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            seen["average"] = {k: v.detach().clone() for k, v in average.module.state_dict().items()}
            seen["n_averaged"] = int(average.n_averaged)

    build = training.build

    def build_with_probe(cfg):
        objects = build(cfg)
        objects["trainer"].callbacks.append(Probe())
        return objects

    monkeypatch.setattr(training, "build", build_with_probe)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*TINY, EMA_ON, "logger=none", "trainer.max_steps=4", f"ckpt_path={last}",
                                          f"paths.output_dir={tmp_path}"])
    training.train(cfg)

    assert_same_weights(seen["module"], saved["current_model_state"])
    assert_same_weights(seen["module"], raw)  # the raw weights, not the EMA
    assert_same_weights(seen["average"], saved["state_dict"])
    assert seen["n_averaged"] == int(saved["averaging_state"]["n_averaged"]) == 3
    after = load(tmp_path / "checkpoints" / "last.ckpt")
    assert after["global_step"] == 4 and int(after["averaging_state"]["n_averaged"]) == 4


def test_before_the_ema_starts_validation_grid_and_checkpoints_use_raw_weights(late_run, off_run):
    for name in ("step_0000002.ckpt", "last.ckpt"):
        ckpt = load(late_run / "checkpoints" / name)
        raw = load(off_run / "checkpoints" / name)["state_dict"]
        assert int(ckpt["averaging_state"]["n_averaged"]) == 0
        assert_same_weights(ckpt["state_dict"], raw)  # not the initial random network
        assert_same_weights(ckpt["current_model_state"], raw)
    late_metrics = json.loads((late_run / "metrics.json").read_text())["metrics"]
    off_metrics = json.loads((off_run / "metrics.json").read_text())["metrics"]
    assert late_metrics["val/loss"] == off_metrics["val/loss"]  # validation at step 2 ran on the raw weights
    assert late_metrics == off_metrics
    grid = "samples/step_0000003.png"
    assert (late_run / grid).read_bytes() == (off_run / grid).read_bytes()


def train_in_process(monkeypatch, out_dir: Path, overrides: list[str], *extra_callbacks: L.Callback) -> None:
    """``ncsn.app.train.train`` with extra callbacks appended to the trainer's."""
    build = training.build

    def build_with(cfg):
        objects = build(cfg)
        objects["trainer"].callbacks.extend(extra_callbacks)
        return objects

    monkeypatch.setattr(training, "build", build_with)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*TINY, "logger=none", *overrides, f"paths.output_dir={out_dir}"])
    training.train(cfg)


class StartProbe(L.Callback):
    """The module's weights when training (re)starts, after a resume's restore."""

    def __init__(self) -> None:
        self.module: dict | None = None

    def on_train_start(self, trainer, pl_module):
        self.module = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def test_a_checkpoint_saved_inside_validation_equals_one_saved_after_it_and_resumes_raw(tmp_path, monkeypatch):
    """A SIGUSR1 pre-emption save can come at any moment, mid-validation included: it must hold the same weights
    in the same places as a save just outside validation, and a run resumed from it trains on the raw weights."""

    class SaveInAndAfterValidation(L.Callback):
        def __init__(self) -> None:
            self.raw: dict | None = None

        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            if batch_idx == 0 and not trainer.sanity_checking and trainer.global_step == 2:
                trainer.save_checkpoint(str(tmp_path / "mid.ckpt"))

        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking and trainer.global_step == 2:
                trainer.save_checkpoint(str(tmp_path / "after.ckpt"))
                self.raw = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    saver = SaveInAndAfterValidation()
    train_in_process(monkeypatch, tmp_path / "run", [EMA_ON, "trainer.max_steps=3"], saver)
    mid, after = load(tmp_path / "mid.ckpt"), load(tmp_path / "after.ckpt")
    assert mid["global_step"] == after["global_step"] == 2
    assert_same_weights(mid["state_dict"], after["state_dict"])
    assert_same_weights(mid["current_model_state"], after["current_model_state"])
    assert_same_weights(mid["current_model_state"], saver.raw)  # the weights being trained
    assert differs(mid["state_dict"], mid["current_model_state"])

    probe = StartProbe()
    train_in_process(monkeypatch, tmp_path / "resumed", [EMA_ON, "trainer.max_steps=3",
                                                         f"ckpt_path={tmp_path / 'mid.ckpt'}"], probe)
    assert_same_weights(probe.module, mid["current_model_state"])


def test_resume_with_ema_switched_off_continues_from_the_raw_weights(ema_run, tmp_path, monkeypatch):
    saved = load(ema_run / "checkpoints" / "last.ckpt")
    probe = StartProbe()
    train_in_process(monkeypatch, tmp_path, ["callbacks.ema=null", "trainer.max_steps=4",
                                             f"ckpt_path={ema_run / 'checkpoints' / 'last.ckpt'}"], probe)
    assert_same_weights(probe.module, saved["current_model_state"])
    after = load(tmp_path / "checkpoints" / "last.ckpt")
    assert after["global_step"] == 4 and "current_model_state" not in after


def test_validation_measures_the_trained_weights_and_logs_the_averages_beside_them(ema_run, off_run):
    on = json.loads((ema_run / "metrics.json").read_text())["metrics"]
    off = json.loads((off_run / "metrics.json").read_text())["metrics"]
    assert on["val/loss"] == off["val/loss"]  # same seed, same raw weights: EMA does not change val/loss
    assert "val_ema/loss" in on and on["val_ema/loss"] != on["val/loss"] and "val_ema/loss" not in off


class AverageOnAnotherDevice(L.Callback):
    """Moves the EMA's average to the meta device when training starts: a stand-in, on a CPU-only machine, for
    ``callbacks.ema.device=cpu`` on a GPU run (an average that is not where the validation batches are)."""

    def on_train_start(self, trainer, pl_module):
        ema = next(cb for cb in trainer.callbacks if isinstance(cb, EMA))
        average_model(ema).module.to("meta")


def test_an_average_on_another_device_than_the_batches_skips_val_ema_with_one_line(tmp_path, monkeypatch, caplog):
    caplog.set_level("INFO", logger="ncsn")
    train_in_process(monkeypatch, tmp_path, [EMA_ON, "callbacks.sample_grid=null", "callbacks.model_checkpoint=null"],
                     AverageOnAnotherDevice())
    metrics = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    assert "val/loss" in metrics and "val_ema/loss" not in metrics
    lines = [r.getMessage() for r in caplog.records if "val_ema/loss is not computed" in r.getMessage()]
    assert lines == [("val_ema/loss is not computed: the EMA average lives on meta (callbacks.ema.device), the "
                      "validation batches on cpu")]  # once, though the run validates twice


class AverageReportingAnotherDevice(L.Callback):
    """Before every step, makes the EMA's average report the meta device while its tensors stay on the CPU: a
    stand-in, on a CPU-only machine, for ``callbacks.ema.device=cpu`` on a GPU run as the sample-grid pass sees it
    (an average whose ``device``, where ``sample`` draws its first noise, is not the training module's). Records,
    for every ``sample`` call on the average: (its device, its weights' device, the generator's device)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []
        self.average = None

    def on_train_start(self, trainer, pl_module):
        self.average = next(cb for cb in trainer.callbacks if isinstance(cb, EMA))._average_model.module
        sample = self.average.sample

        def recording_sample(n, generator=None, **kwargs):
            weights = next(self.average.parameters()).device
            self.calls.append((str(self.average.device), str(weights), str(generator.device)))
            return sample(n, generator=generator, **kwargs)

        self.average.sample = recording_sample

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.average._device = torch.device("meta")  # what LightningModule.device reports


def test_with_the_average_on_another_device_the_sample_grid_samples_on_the_training_device(tmp_path, monkeypatch):
    """``callbacks.ema.device=cpu`` on a GPU: the generator was made on the training device while the average sampled
    on its own, and the first pass after the EMA started crashed. Now each pass moves the average to the training
    device (``ncsn.app.ema.sampling_module``) and back, and the EMA goes on updating it."""
    probe = AverageReportingAnotherDevice()
    train_in_process(monkeypatch, tmp_path, [EMA_ON, "callbacks.sample_grid.every_n_steps=2",
                                             "callbacks.model_checkpoint=null"], probe)
    assert probe.calls == [("cpu", "cpu", "cpu")] * 2  # steps 2 and 4 (the end pass is the same step as 4)
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step_0000002.png", "step_0000004.png"]
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert [h["step"] for h in record["quality"]["history"]] == [2, 4]
    assert all(np.isfinite(h["quality/kid"]) for h in record["quality"]["history"])
    assert next(probe.average.parameters()).device.type == "cpu"  # moved back after the pass
