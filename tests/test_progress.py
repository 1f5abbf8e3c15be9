"""The step progress bar: one bar over the whole step-limited run, metrics read only when it is redrawn."""

from __future__ import annotations

import io
import time
from datetime import timedelta
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import ROOT
from fakes import FixedTimer
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import TQDMProgressBar
from torch.utils.data import DataLoader, TensorDataset

from ncsn.app.common import instantiate
from ncsn.app.progress import StepProgressBar, _StepTqdm, time_limited_total


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def three_batches() -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(6, 4)), batch_size=2)


class CountingBar(StepProgressBar):
    """Records the global step at every metrics read, and where the bar stands at each epoch start."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.read_at: list[int] = []
        self.n_at_epoch_start: list[int] = []
        self.n_at_train_start: int | None = None

    def get_metrics(self, trainer, pl_module):
        self.read_at.append(trainer.global_step)
        return super().get_metrics(trainer, pl_module)

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self.n_at_train_start = self.train_progress_bar.n

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self.n_at_epoch_start.append(self.train_progress_bar.n)


def fit(tmp_path, bar, max_steps: int, ckpt_path=None, **trainer_kwargs) -> L.Trainer:
    trainer = L.Trainer(max_steps=max_steps, callbacks=[bar], logger=False, enable_checkpointing=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path,
                        **{"max_epochs": -1, **trainer_kwargs})
    trainer.fit(Tiny(), three_batches(), ckpt_path=ckpt_path)
    return trainer


def test_bar_counts_the_global_steps_of_the_whole_run_and_reads_metrics_only_at_redraws(tmp_path):
    bar = CountingBar(refresh_rate=2, interactive=True)
    trainer = fit(tmp_path, bar, max_steps=7)
    assert trainer.global_step == 7 and trainer.current_epoch >= 2  # 3 batches an epoch: the run spans 3 epochs
    tqdm_bar = bar.train_progress_bar
    assert (tqdm_bar.total, tqdm_bar.n, tqdm_bar.initial) == (7, 7, 0)  # not 3 batches of the last epoch
    assert bar.n_at_epoch_start == [0, 2, 6], "the bar carries on across epochs (Lightning's restarts at 0)"
    assert bar.read_at == [2, 4, 6, 7], "metrics (a host sync) are read at redraws only: every 2 steps and the last"
    assert "step/s" in str(tqdm_bar) and "<00:00" in str(tqdm_bar)  # speed and time remaining


def test_a_resumed_run_starts_the_bar_at_the_checkpoint_step(tmp_path):
    first = fit(tmp_path, StepProgressBar(interactive=True), max_steps=4)
    ckpt = tmp_path / "step4.ckpt"
    first.save_checkpoint(ckpt)
    bar = CountingBar(refresh_rate=2, interactive=True)
    fit(tmp_path, bar, max_steps=7, ckpt_path=ckpt)
    tqdm_bar = bar.train_progress_bar
    assert bar.n_at_train_start == 4 and tqdm_bar.initial == 4  # the rate counts this run's 3 steps only
    assert (tqdm_bar.total, tqdm_bar.n) == (7, 7)
    assert bar.read_at == [6, 7]


def test_default_refresh_rate_reads_metrics_once_in_seven_steps(tmp_path):
    bar = CountingBar(interactive=True)  # refresh_rate 10 > 7 steps: only the last step is drawn
    fit(tmp_path, bar, max_steps=7)
    assert bar.refresh_rate == 10 and bar.read_at == [7]


def test_output_to_a_file_is_whole_lines_at_most_one_per_interval(tmp_path, capsys):
    bar = CountingBar(refresh_rate=2, log_interval_s=0)  # interactive=None: pytest's captured stdout is no tty
    fit(tmp_path, bar, max_steps=7, limit_val_batches=1, val_check_interval=2, check_val_every_n_epoch=None)
    out = capsys.readouterr().out
    assert "\r" not in out and "\x1b" not in out
    lines = [line for line in out.splitlines() if "/7" in line]
    assert [line.split("|")[-1].split()[0] for line in lines][:5] == ["0/7", "2/7", "4/7", "6/7", "7/7"]
    assert "Validation" not in out and "Sanity" not in out  # no validation bars in a log file
    assert all("step/s" in line for line in lines[1:]) and "train/loss=" in lines[-1]

    throttled = CountingBar(refresh_rate=2, log_interval_s=3600)
    fit(tmp_path, throttled, max_steps=7)
    assert throttled.read_at == [7], "nothing is drawn (or read) before the interval has passed, but the last step"


def test_without_max_steps_it_is_lightnings_epoch_bar(tmp_path):
    bar = CountingBar(refresh_rate=1, interactive=True)
    fit(tmp_path, bar, max_steps=-1, max_epochs=2)
    assert isinstance(bar, TQDMProgressBar)
    assert (bar.train_progress_bar.total, bar.train_progress_bar.n) == (3, 3)
    assert bar.n_at_epoch_start == [0, 0]


def test_zero_refresh_rate_turns_it_off(tmp_path):
    bar = CountingBar(refresh_rate=0)
    trainer = fit(tmp_path, bar, max_steps=4)
    assert trainer.global_step == 4 and bar.read_at == []


@pytest.mark.parametrize("overrides, expected", [
    ([], StepProgressBar),
    (["callbacks.progress_bar=null"], None),
])
def test_the_default_callbacks_use_it_and_null_removes_it(overrides, expected):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["paths.output_dir=/tmp/unused", *overrides])
    entry = cfg.callbacks.get("progress_bar")
    if expected is None:
        assert entry is None
    else:
        bar = instantiate(entry)
        assert type(bar) is expected and bar.refresh_rate == 10


class QuietLoss(Tiny):
    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("train/loss", loss)  # no prog_bar=True: Lightning would .item() it at every step
        return loss


def test_a_loss_logged_without_prog_bar_is_still_shown(tmp_path):
    bar = StepProgressBar(refresh_rate=2, interactive=True)
    trainer = L.Trainer(max_steps=4, max_epochs=-1, callbacks=[bar], logger=False, enable_checkpointing=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path)
    trainer.fit(QuietLoss(), three_batches())
    assert "train/loss=" in str(bar.train_progress_bar)
    assert "train/loss=" not in str(StepProgressBar(metrics=()).get_metrics(trainer, trainer.lightning_module))


# ------------------------------------------------------------------------------------------------ max_time

def test_time_limited_total_is_where_max_time_stops_the_run_when_that_comes_first():
    # 100 steps in 10 s: 10 step/s. 4,500 steps left = 450 s, but max_time leaves 50 s: stops near step 600
    assert time_limited_total(step=100, initial=0, elapsed=10.0, time_left=50.0, max_steps=4600) == 600
    assert time_limited_total(step=100, initial=0, elapsed=10.0, time_left=50.0, max_steps=300) is None  # 20 s
    assert time_limited_total(step=150, initial=100, elapsed=10.0, time_left=50.0, max_steps=4600) == 400  # resumed
    assert time_limited_total(step=100, initial=0, elapsed=10.0, time_left=None, max_steps=4600) is None
    assert time_limited_total(step=0, initial=0, elapsed=10.0, time_left=50.0, max_steps=4600) is None  # no rate


@pytest.mark.parametrize("left, total, eta, note", [
    (50.0, 600, "<00:50", "stops at max_time 11:30"),  # max_time first: its 50 s, not 4,500 steps at 10 step/s
    (1000.0, 4600, "<07:30", None),  # max_steps first: 4,500 steps at 10 step/s
])
def test_bar_total_and_eta_honour_max_time(left, total, eta, note):
    bar = StepProgressBar(interactive=False)
    bar.setup(SimpleNamespace(callbacks=[FixedTimer(left)], max_steps=4600, current_epoch=3, global_step=100,
                              is_global_zero=True), None, "fit")
    tqdm_bar = _StepTqdm(total=4600, initial=0, file=io.StringIO(), bar_format=bar.BAR_FORMAT, unit="step")
    tqdm_bar._time = lambda: 10.0  # 10 s since the bar started at 0 (tqdm's clock)
    tqdm_bar.start_t = 0.0
    tqdm_bar.n = 100
    bar._apply_time_limit(bar.trainer, tqdm_bar, 100)
    shown = str(tqdm_bar)
    assert tqdm_bar.total == total and f"100/{total} [00:10{eta}" in shown, shown
    if note:
        assert shown.startswith(f"Training (epoch 3, {note})")
    else:
        assert "max_time" not in shown


class Slow(Tiny):
    def training_step(self, batch, batch_idx):
        time.sleep(0.01)  # at most 100 step/s: max_steps would take hours, max_time ends the run
        return super().training_step(batch, batch_idx)


def test_a_run_ended_by_max_time_says_so_on_its_bar(tmp_path, capsys):
    bar = CountingBar(refresh_rate=5, log_interval_s=0)
    trainer = L.Trainer(max_steps=10**6, max_time=timedelta(seconds=2), max_epochs=-1, callbacks=[bar], logger=False,
                        enable_checkpointing=False, enable_model_summary=False, accelerator="cpu",
                        default_root_dir=tmp_path)
    trainer.fit(Slow(), three_batches())
    step = trainer.global_step
    assert 0 < step < 10**6
    lines = [line for line in capsys.readouterr().out.splitlines() if "step/s" in line]
    middle, last = lines[1:-1], lines[-1]  # the first (0/1000000) has no rate yet
    assert middle and all("stops at max_time 00:02" in line for line in middle), lines
    totals = [int(line.split("|")[-1].split()[0].split("/")[1]) for line in middle]
    assert all(t < 10**6 for t in totals), totals  # the step it will stop at, not max_steps
    etas = [line.split("<")[1].split(",")[0] for line in middle]
    assert all(e in ("00:00", "00:01", "00:02") for e in etas), etas  # max_time - elapsed, not hours of steps
    assert "stopped at max_time 00:02, max_steps 1000000): 100%" in last and f"{step}/{step} [" in last, last
    assert sum(f"{step}/{step} [" in line for line in lines) == 1, "the last line is written once"
