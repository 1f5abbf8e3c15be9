"""ncsn.app.checkpoints.FinalStepCheckpoint: last.ckpt holds the final step, through ModelCheckpoint's own saving path.

A run that stops between two periodic saves (max_steps not a multiple of every_n_train_steps, max_time) must leave
the final step in last.ckpt, with ``last_model_path`` set, the loggers told, ``save_weights_only`` and
``save_last="link"`` honoured, and no ``last-v1.ckpt`` beside it. Tiny one-parameter runs on the CPU.
"""

from __future__ import annotations

import time

import lightning as L
import pytest
import torch
from conftest import ROOT
from hydra import compose, initialize_config_dir
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader, TensorDataset

from ncsn.app.checkpoints import AtomicCheckpointIO, FinalStepCheckpoint
from ncsn.app.common import instantiate


class OneParameter(L.LightningModule):
    def __init__(self, sleep_s: float = 0.0):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.sleep_s = sleep_s

    def training_step(self, batch, batch_idx):
        time.sleep(self.sleep_s)
        return (self.w - batch[0].mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.ones(64, 1)), batch_size=4)


class SavedCheckpoints(Logger):
    """A logger that records the checkpoint paths ModelCheckpoint tells it about (what W&B log_model reads)."""

    def __init__(self):
        super().__init__()
        self.told: list[str] = []

    name, version = "record", 0

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def after_save_checkpoint(self, checkpoint_callback):
        self.told.append(checkpoint_callback.last_model_path)


def fit(tmp_path, *, max_steps=3, max_time=None, sleep_s=0.0, every=2, **checkpoint_kw):
    checkpoint = FinalStepCheckpoint(dirpath=tmp_path, filename="step_{step:03d}", auto_insert_metric_name=False,
                                     every_n_train_steps=every, save_top_k=-1, save_on_train_epoch_end=False,
                                     **{"save_last": True, **checkpoint_kw})
    logger = SavedCheckpoints()
    trainer = L.Trainer(max_steps=max_steps, max_time=max_time, accelerator="cpu", logger=logger,
                        callbacks=[checkpoint], plugins=[AtomicCheckpointIO()], enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(OneParameter(sleep_s))
    return trainer, checkpoint, logger


def step_of(path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def names(tmp_path) -> set[str]:
    return {p.name for p in tmp_path.iterdir()}


def test_last_ckpt_holds_the_final_step_between_periodic_saves(tmp_path):
    trainer, checkpoint, logger = fit(tmp_path, max_steps=3, every=2)
    assert trainer.global_step == 3
    assert names(tmp_path) == {"step_002.ckpt", "last.ckpt"}  # no last-v1.ckpt
    assert step_of(tmp_path / "last.ckpt") == 3 and step_of(tmp_path / "step_002.ckpt") == 2
    assert checkpoint.last_model_path == str(tmp_path / "last.ckpt")
    assert logger.told[-1] == str(tmp_path / "last.ckpt")  # the loggers heard of the final save
    assert "optimizer_states" in torch.load(tmp_path / "last.ckpt", weights_only=False)


def test_no_periodic_save_at_all_gives_one_last_ckpt(tmp_path):
    _, checkpoint, _ = fit(tmp_path, max_steps=3, every=0)
    assert names(tmp_path) == {"last.ckpt"} and step_of(tmp_path / "last.ckpt") == 3
    assert checkpoint.last_model_path == str(tmp_path / "last.ckpt")


def test_a_final_step_on_the_interval_is_saved_once(tmp_path):
    _, _, logger = fit(tmp_path, max_steps=4, every=2)
    assert names(tmp_path) == {"step_002.ckpt", "step_004.ckpt", "last.ckpt"}
    assert step_of(tmp_path / "last.ckpt") == 4 and len(logger.told) == 4  # 2 periodic saves, each + last


def test_max_time_stop_lands_in_last_ckpt(tmp_path):
    trainer, _, _ = fit(tmp_path, max_steps=-1, max_time={"seconds": 1.5}, sleep_s=0.1, every=4)
    assert trainer.global_step > 0  # stopped by the clock (about step 13: mostly between two saves)
    assert step_of(tmp_path / "last.ckpt") == trainer.global_step and "last-v1.ckpt" not in names(tmp_path)


def test_save_weights_only_holds_for_the_final_save(tmp_path):
    fit(tmp_path, max_steps=3, every=2, save_weights_only=True)
    last = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert last["global_step"] == 3 and "optimizer_states" not in last


def test_save_last_link_points_at_the_final_steps_file(tmp_path):
    _, checkpoint, _ = fit(tmp_path, max_steps=3, every=2, save_last="link")
    last = tmp_path / "last.ckpt"
    assert last.is_symlink() and last.resolve() == (tmp_path / "step_003.ckpt")
    assert step_of(last) == 3 and names(tmp_path) == {"step_002.ckpt", "step_003.ckpt", "last.ckpt"}
    assert checkpoint.last_model_path == str(last)


def test_the_default_config_checkpoints_with_it(tmp_path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={tmp_path}"])
    assert isinstance(instantiate(cfg.callbacks.model_checkpoint), FinalStepCheckpoint)


@pytest.mark.slow
def test_under_ddp_spawn_the_training_processes_save_the_final_step(tmp_path):
    checkpoint = FinalStepCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_last=True)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
                        callbacks=[checkpoint], enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0)
    trainer.fit(OneParameter())
    assert step_of(tmp_path / "last.ckpt") == 3 and "last-v1.ckpt" not in names(tmp_path)
