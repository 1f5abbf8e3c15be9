"""metrics.json's speed: ``train_seconds`` counts the training steps, not validation, checkpoints or sample grids."""

from __future__ import annotations

import json
import logging
import time

import lightning as L
import pytest
import torch
from conftest import ROOT, TINY
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from ncsn.app.callbacks import SampleGridCallback
from ncsn.app.run_files import MetricsFileCallback

STEPS, BATCH = 6, 2
# Validation at step 5, sample grids at step 4 and at the end, checkpoints at steps 3 and 6: each kind of pause
# in steps of its own (a pause left out with another one at the same step would test nothing), and each longer
# than all the training steps together, so counting any of them is unmistakable.
STEP_S, VAL_S, GRID_S, SAVE_S = 0.05, 0.8, 0.8, 0.4


class VirtualClock:
    """``time.perf_counter`` that moves only by the pauses the test makes (``time.sleep``): the durations the
    callback measures are exactly those pauses, on any machine and under any load (a wall-clock bound on the
    steps' own overhead -- Lightning's hooks, the optimizer -- failed on busy or slower CI machines)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch) -> VirtualClock:
    virtual = VirtualClock()
    monkeypatch.setattr(time, "perf_counter", virtual.perf_counter)
    monkeypatch.setattr(time, "sleep", virtual.sleep)
    return virtual


class Slow(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        time.sleep(STEP_S)
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        time.sleep(VAL_S)

    # What SampleGridCallback uses of a ScoreModel: its noise levels, its sampler settings, their plan and ``sample``.
    sigmas = torch.tensor([1.0, 0.1])

    def sampling_settings(self, **overrides):
        return {"name": "ald", "n_steps_each": 1, "step_lr": 1e-5, "denoise": False, **overrides}

    def sampling_plan(self, settings):
        from ncsn.samplers import build_plan

        return build_plan(self.sigmas, settings)

    def sample(self, n, generator=None, **kwargs):
        time.sleep(GRID_S)
        return torch.rand(n, 1, 8, 8, generator=generator)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class SlowSave(L.Callback):
    def __init__(self) -> None:
        self.saves = 0

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.saves += 1
        time.sleep(SAVE_S)


@pytest.mark.parametrize("metrics_first", [True, False])
def test_train_seconds_leave_out_validation_checkpoints_and_sample_grids(tmp_path, metrics_first, caplog, clock):
    caplog.set_level(logging.INFO, logger="ncsn")
    metrics = MetricsFileCallback(tmp_path / "metrics.json")
    slow_save = SlowSave()
    others = [SampleGridCallback(every_n_steps=4, num_samples=4), slow_save,
              ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)]
    callbacks = [metrics, *others] if metrics_first else [*others, metrics]
    data = DataLoader(TensorDataset(torch.randn(3 * BATCH, 4)), batch_size=BATCH)  # 3 batches an epoch
    trainer = L.Trainer(max_steps=STEPS, max_epochs=-1, val_check_interval=5, check_val_every_n_epoch=None,
                        limit_val_batches=1, num_sanity_val_steps=0, callbacks=callbacks, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        default_root_dir=tmp_path)
    trainer.fit(Slow(), data, data)
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert sorted(p.name for p in (tmp_path / "samples").glob("step_*.png")) == ["step_0000004.png",
                                                                                "step_0000006.png"]
    assert len(list((tmp_path / "ckpt").glob("*.ckpt"))) == 2
    assert slow_save.saves >= 2
    # On the virtual clock every duration is a sum of the pauses, exactly (up to float rounding): the wall time
    # holds all of them, the training time only the steps'.
    paused = VAL_S + 2 * GRID_S + slow_save.saves * SAVE_S
    assert record["wall_seconds"] == pytest.approx(paused + STEPS * STEP_S, abs=1e-9)
    # The first step is timed on its own (first_step_seconds) and left out. First in the callback list (where
    # ncsn.app.train.build puts it) every other step is counted; elsewhere the step whose segment held the step-4
    # grid is left out with it. Counting any pause would add >= SAVE_S = 0.4 s.
    counted = STEPS - 1 if metrics_first else STEPS - 2
    assert record["train_seconds"] == pytest.approx(counted * STEP_S, abs=1e-9)
    assert record["train_steps"] == STEPS
    assert record["first_step_seconds"] == pytest.approx(STEP_S, abs=1e-9)
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("first training step took")]
    assert logged == [(f"first training step took {record['first_step_seconds']:.2f} s (includes torch.compile / "
                       "CUDA-graph capture when the fast path is on)")]
    assert record["images_per_second"] == pytest.approx((STEPS - 1) * BATCH / record["train_seconds"])


def test_build_puts_the_metrics_file_callback_first(tmp_path):
    from ncsn.app.train import build

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={tmp_path}", *TINY, "logger=none"])
    trainer = build(cfg)["trainer"]
    assert isinstance(trainer.callbacks[0], MetricsFileCallback)
    assert any(isinstance(c, SampleGridCallback) for c in trainer.callbacks[1:])
