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

from ncsn.callbacks import MetricsFileCallback, SampleGridCallback

STEPS, BATCH = 6, 2
# Validation at step 5, sample grids at step 4 and at the end, checkpoints at steps 3 and 6: each kind of pause
# adds >= 0.8 s in steps of its own (a pause left out with another one at the same step would test nothing).
STEP_S, VAL_S, GRID_S, SAVE_S = 0.05, 0.8, 0.8, 0.4


class Slow(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        time.sleep(STEP_S)
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        time.sleep(VAL_S)

    def sample(self, n, generator=None, **kwargs):  # what SampleGridCallback calls
        time.sleep(GRID_S)
        return torch.rand(n, 1, 8, 8, generator=generator)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class SlowSave(L.Callback):
    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        time.sleep(SAVE_S)


@pytest.mark.parametrize("metrics_first", [True, False])
def test_train_seconds_leave_out_validation_checkpoints_and_sample_grids(tmp_path, metrics_first, caplog):
    caplog.set_level(logging.INFO, logger="ncsn")
    metrics = MetricsFileCallback(tmp_path / "metrics.json")
    others = [SampleGridCallback(every_n_steps=4, num_samples=4), SlowSave(),
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
    assert record["wall_seconds"] >= VAL_S + 2 * GRID_S + 2 * SAVE_S + STEPS * STEP_S
    # Counting any kind of pause would add >= 0.8 s. The first step is timed on its own (first_step_seconds) and
    # left out. First in the callback list (where ncsn.training.build puts it) every other step is counted;
    # elsewhere the step whose segment held the step-4 grid is left out with it.
    lowest = (STEPS - 1) * STEP_S if metrics_first else (STEPS - 2) * STEP_S
    assert lowest <= record["train_seconds"] < (STEPS - 1) * STEP_S + 0.5
    assert record["train_steps"] == STEPS
    assert STEP_S <= record["first_step_seconds"] < STEP_S + 0.5
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("first training step took")]
    assert logged == [(f"first training step took {record['first_step_seconds']:.2f} s (includes torch.compile / "
                       "CUDA-graph capture when the fast path is on)")]
    assert record["images_per_second"] == pytest.approx((STEPS - 1) * BATCH / record["train_seconds"])


def test_build_puts_the_metrics_file_callback_first(tmp_path):
    from ncsn.training import build

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={tmp_path}", *TINY, "logger=none"])
    trainer = build(cfg)["trainer"]
    assert isinstance(trainer.callbacks[0], MetricsFileCallback)
    assert any(isinstance(c, SampleGridCallback) for c in trainer.callbacks[1:])
