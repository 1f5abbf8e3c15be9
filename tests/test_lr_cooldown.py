"""The learning-rate cooldown (``callbacks.lr_cooldown``, off unless switched on): the rate a step really uses,
counted against steps and against ``max_time``, with the scheduler's own values left alone, under DDP too."""

from __future__ import annotations

import itertools
import time
from datetime import timedelta
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import compose_train
from fakes import FixedTimer
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, Timer
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from ncsn.app.lr_cooldown import LRCooldown, budget_spent, cooldown_factor
from ncsn.errors import ConfigError


class ConstantGradient(L.LightningModule):
    """loss = w, so dloss/dw = 1 and an SGD step moves w by exactly -lr: the step's rate is the change in w."""

    def __init__(self, lr: float = 0.1, warmup: bool = False):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.lr, self.warmup = lr, warmup
        self.moves: list[float] = []
        self._before = 0.0

    def on_train_batch_start(self, batch, batch_idx):
        self._before = float(self.w.detach())

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.moves.append(self._before - float(self.w.detach()))

    def training_step(self, batch, batch_idx):
        return self.w * 1.0 + 0.0 * batch[0].sum()

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
        if not self.warmup:
            return optimizer
        warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.5, total_iters=2)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.ones(64, 1)), batch_size=4)


def fit(module, callbacks, tmp_path, **trainer_kwargs):
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                        default_root_dir=tmp_path, **trainer_kwargs)
    trainer.fit(module)
    return trainer


def test_the_factor_is_one_then_falls_linearly_to_the_floor():
    assert cooldown_factor(0.0, 0.3) == 1.0 and cooldown_factor(0.7, 0.3) == 1.0
    assert cooldown_factor(0.85, 0.3) == pytest.approx(0.5) and cooldown_factor(1.0, 0.3) == 0.0
    assert cooldown_factor(1.0, 0.3, min_factor=0.1) == 0.1 and cooldown_factor(0.97, 0.3, 0.2) == pytest.approx(0.2)


def test_each_step_moves_by_the_cooled_rate_over_a_step_budget(tmp_path):
    module = ConstantGradient(lr=0.1)
    fit(module, [LRCooldown(fraction=0.5)], tmp_path, max_steps=10)
    # step k (0-based) has spent k/10 of the budget: factor min(1, (1 - k/10) / 0.5)
    expected = [0.1 * min(1.0, (1 - k / 10) / 0.5) for k in range(10)]
    assert module.moves == pytest.approx(expected, rel=1e-12)
    assert module.moves[-1] == pytest.approx(0.02)  # the last step still moves: 1/10 left of a 0.5 cooldown


def test_without_the_callback_every_step_moves_by_the_full_rate(tmp_path):
    module = ConstantGradient(lr=0.1)
    fit(module, [], tmp_path, max_steps=10)
    assert module.moves == pytest.approx([0.1] * 10, rel=1e-12)


def test_the_scheduler_and_the_lr_monitor_keep_their_own_values(tmp_path):
    module = ConstantGradient(lr=0.1, warmup=True)
    logger = CSVLogger(tmp_path, name="csv", version=0)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=logger, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1, max_steps=8,
                        callbacks=[LRCooldown(fraction=0.5), LearningRateMonitor(logging_interval="step")],
                        default_root_dir=tmp_path)
    trainer.fit(module)
    # warm-up 0.05 -> 0.075 -> 0.1 (LinearLR's chained updates), then the cooldown over steps 4..7 on top
    scheduled = [0.05, 0.075, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]
    factors = [min(1.0, (1 - k / 8) / 0.5) for k in range(8)]
    assert module.moves == pytest.approx([s * f for s, f in zip(scheduled, factors)], rel=1e-12)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1)  # the scheduler's, restored
    rows = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    lr_col, factor_col = header.index("lr-SGD"), header.index("train/lr_factor")
    lrs = [float(r.split(",")[lr_col]) for r in rows[1:] if r.split(",")[lr_col]]
    logged_factors = [float(r.split(",")[factor_col]) for r in rows[1:] if r.split(",")[factor_col]]
    assert lrs == pytest.approx(scheduled, rel=1e-9)  # the dashboard's lr-SGD is the scheduler's
    assert logged_factors == pytest.approx(factors, rel=1e-9)  # and the factor is beside it


def test_the_budget_is_time_when_max_time_comes_first_and_steps_when_they_do():
    timer = FixedTimer(left=150.0, duration="00:00:10:00")
    assert budget_spent(1000, 6000, timer) == pytest.approx(0.75)  # 450 of 600 s, 1,000 of 6,000 steps
    assert budget_spent(5400, 6000, timer) == pytest.approx(0.9)  # the steps run out first
    assert budget_spent(5, float("inf"), None) == 0.0  # no bound at all


class Slow(ConstantGradient):
    def training_step(self, batch, batch_idx):
        time.sleep(0.02)
        return super().training_step(batch, batch_idx)


def test_a_time_budgeted_run_cools_down_before_max_time_stops_it(tmp_path):
    module = Slow(lr=0.1)
    fit(module, [LRCooldown(fraction=0.5)], tmp_path, max_steps=10**6, max_epochs=-1,
        max_time=timedelta(seconds=2))
    moves = module.moves
    assert 10 < len(moves) < 10**6
    assert moves[0] == pytest.approx(0.1)  # the first half of the time at the full rate
    assert moves[-1] < 0.05  # the last step in the last quarter of the time
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(moves))  # never rising: the clock only moves on


@pytest.mark.parametrize("kwargs", [{"fraction": 0.0}, {"fraction": 1.5}, {"min_factor": -0.1}])
def test_bad_settings_are_refused_with_the_key_to_fix(kwargs):
    with pytest.raises(ConfigError, match="callbacks.lr_cooldown"):
        LRCooldown(**kwargs)


def test_off_by_default_and_in_the_cpu_recipe_and_switched_on_from_the_command_line():
    assert compose_train().callbacks.lr_cooldown is None  # the paper recipes train at a constant rate
    assert compose_train("experiment=cpu").callbacks.lr_cooldown is None  # measured: no gain there
    on = compose_train("experiment=cpu",
                       "callbacks.lr_cooldown={_target_:ncsn.app.lr_cooldown.LRCooldown,fraction:0.2}")
    cooldown = instantiate(on.callbacks.lr_cooldown)
    assert isinstance(cooldown, LRCooldown) and cooldown.fraction == 0.2 and cooldown.min_factor == 0.0


class RankSkewedTimer(Timer):
    """A clock that reads 450 s of 600 on rank 0 and 550 s on rank 1 (the ranks' clocks are never equal)."""

    def __init__(self) -> None:
        super().__init__(duration="00:00:10:00")
        self.rank = 0

    def setup(self, trainer, pl_module, stage) -> None:
        self.rank = trainer.global_rank

    def time_elapsed(self, stage="train") -> float:
        return 450.0 + 100.0 * self.rank

    def time_remaining(self, stage="train") -> float:
        return 600.0 - self.time_elapsed(stage)


class SaveWeightPerRank(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module) -> None:
        (self.out / f"w{trainer.global_rank}.txt").write_text(repr(float(pl_module.w.detach())))


@pytest.mark.slow
def test_under_ddp_spawn_every_rank_steps_with_rank_0s_rate(tmp_path):
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, max_steps=10,
                        callbacks=[LRCooldown(fraction=0.5), RankSkewedTimer(), SaveWeightPerRank(tmp_path)],
                        default_root_dir=tmp_path)
    trainer.fit(ConstantGradient(lr=0.1))
    # rank 0's clock: 450 of 600 s spent (rank 1's 550: factor 1/6), until the 10 steps run out further: step k
    # spends max(0.75, k/10), so 0.5 on steps 0-7, then 0.4 and 0.2
    expected = -sum(0.1 * cooldown_factor(max(0.75, k / 10), 0.5) for k in range(10))
    weights = [float((tmp_path / f"w{rank}.txt").read_text()) for rank in (0, 1)]
    assert expected == pytest.approx(-0.46) and weights == pytest.approx([expected, expected], rel=1e-12)
