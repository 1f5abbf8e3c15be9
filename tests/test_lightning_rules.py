"""Lightning behaviour we rebuild from public trainer state instead of calling its private API: pinned here, so a
Lightning upgrade that changes the rule fails a test instead of silently moving our per-step diagnostics."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import ROOT, TINY
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint, WeightAveraging
from torch.utils.data import DataLoader, TensorDataset

from ncsn.app.best_checkpoint import BestQualityCheckpoint
from ncsn.app.common import instantiate
from ncsn.app.lightning_private import (
    attached_trainer,
    average_model,
    loop_state_at,
    monitor_candidates,
    publish_callback_metrics,
    save_last,
    save_top_k,
    should_skip_saving,
)
from ncsn.app.progress import StepProgressBar


class CompareLoggingSteps(L.Callback):
    """At both places ``ScoreModel._logging_step`` is asked (around training_step and before the optimizer step):
    our answer and Lightning's own (private) one; stops training at ``stop_at`` to cover ``should_stop``."""

    def __init__(self, stop_at: int) -> None:
        self.stop_at = stop_at
        self.pairs: list[tuple[int, bool, bool]] = []

    def _compare(self, trainer, pl_module) -> None:
        self.pairs.append((trainer.global_step, pl_module._logging_step(),
                           bool(trainer._logger_connector.should_update_logs)))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.stop_at:
            trainer.should_stop = True
        self._compare(trainer, pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._compare(trainer, pl_module)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_logging_steps_are_lightnings_should_update_logs(tmp_path, accumulate):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*TINY, f"paths.output_dir={tmp_path}"])
    compare = CompareLoggingSteps(stop_at=7)
    trainer = L.Trainer(max_steps=20, log_every_n_steps=3, accumulate_grad_batches=accumulate, accelerator="cpu",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[compare])
    trainer.fit(instantiate(cfg.model), datamodule=instantiate(cfg.data))
    assert trainer.global_step < 20  # stopped by should_stop, set at step 7
    assert [ours for _, ours, _ in compare.pairs] == [lightning for _, _, lightning in compare.pairs]
    logged = sorted({step for step, ours, _ in compare.pairs if ours})
    assert logged == [2, 5, 7]  # every 3rd step (1-based) and the one where training stops


# ---------------------------------------------------------------------------------------- ncsn.app.lightning_private
# One test per private Lightning name the code uses (all of them behind ncsn.app.lightning_private): each checks the
# behaviour the code relies on, on one tiny real fit, so that a Lightning upgrade that changes one fails here.
class OneParameter(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch, batch_idx):
        loss = (self.w - batch[0].mean()) ** 2
        self.log("train/loss", loss)  # Lightning's own callback_metrics updates run beside the published ones
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.ones(16, 1)), batch_size=4)


PUBLISHED = {2: 0.5, 3: 0.7, 4: 0.2}  # a 'quality/x' value published at these steps (3 is no improvement)


class PrivateProbe(L.Callback):
    """Calls every ncsn.app.lightning_private function at known steps of a 4-step fit and records what it saw."""

    def __init__(self, checkpoint: ModelCheckpoint, averaging: WeightAveraging) -> None:
        self.checkpoint, self.averaging = checkpoint, averaging
        self.seen: dict = {"skip_before": {}, "skip_after": {}, "best": {}, "candidates": {}, "averaged": {},
                           "metric_at_start": {}}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen["metric_at_start"][trainer.global_step] = trainer.callback_metrics.get("quality/x")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        self.seen["trainer"] = attached_trainer(pl_module) is trainer
        average = average_model(self.averaging)
        self.seen["averaged"][step] = (int(average.n_averaged), float(average.module.w.detach()),
                                       float(pl_module.w.detach()))
        if step not in PUBLISHED:
            return
        publish_callback_metrics(trainer, {"quality/x": PUBLISHED[step]})
        self.seen["skip_before"][step] = should_skip_saving(self.checkpoint, trainer)
        candidates = monitor_candidates(self.checkpoint, trainer)
        self.seen["candidates"][step] = {k: float(v) for k, v in candidates.items()}
        save_top_k(self.checkpoint, trainer, candidates)
        self.seen["best"][step] = (float(self.checkpoint.best_model_score), self.checkpoint.best_model_path)
        self.seen["skip_after"][step] = should_skip_saving(self.checkpoint, trainer)
        if step == 4:
            save_last(self.checkpoint, trainer, candidates)

    def on_train_end(self, trainer, pl_module) -> None:
        publish_callback_metrics(trainer, {"quality/end": 1.5})  # no self.log here: Lightning forbids it


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    out = tmp_path_factory.mktemp("private")
    checkpoint = ModelCheckpoint(dirpath=out, filename="best", monitor="quality/x", mode="min", save_top_k=1,
                                 save_last=True, every_n_train_steps=0, every_n_epochs=0,
                                 enable_version_counter=False, save_on_train_epoch_end=False)
    averaging = EMAWeightAveraging(decay=0.5)
    probe = PrivateProbe(checkpoint, averaging)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, callbacks=[probe, averaging, checkpoint],
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(OneParameter())
    return SimpleNamespace(trainer=trainer, checkpoint=checkpoint, seen=probe.seen, out=out)


def test_attached_trainer_is_the_public_trainer_or_none(probed):
    assert probed.seen["trainer"] is True
    assert attached_trainer(OneParameter()) is None  # LightningModule.trainer raises RuntimeError
    assert attached_trainer(StepProgressBar()) is None  # ProgressBar.trainer raises TypeError


def test_should_skip_saving_checkpoint_is_true_once_saved_at_this_step(probed):
    assert probed.seen["skip_before"] == {2: False, 3: False, 4: False}
    assert probed.seen["skip_after"] == {2: True, 3: False, 4: True}  # step 3 did not improve: nothing saved


def test_monitor_candidates_are_the_callback_metrics_with_step_and_epoch(probed):
    for step, candidates in probed.seen["candidates"].items():
        assert candidates["quality/x"] == pytest.approx(PUBLISHED[step])
        assert candidates["step"] == step and candidates["epoch"] == 0


def test_save_topk_checkpoint_saves_only_on_improvement_and_updates_the_best(probed):
    best = str(probed.out / "best.ckpt")
    assert probed.seen["best"] == {2: (0.5, best), 3: (0.5, best), 4: (pytest.approx(0.2), best)}
    assert torch.load(best, weights_only=False)["global_step"] == 4


def test_save_last_checkpoint_writes_last_ckpt_and_sets_last_model_path(probed):
    last = probed.out / "last.ckpt"
    assert probed.checkpoint.last_model_path == str(last)
    assert torch.load(last, weights_only=False)["global_step"] == 4


def test_average_model_is_the_weight_averaging_callbacks_averaged_copy(probed):
    averaged = probed.seen["averaged"]
    assert [averaged[s][0] for s in (1, 2, 3, 4)] == [0, 1, 2, 3]  # one update per step (after this probe's hook)
    assert all(avg != raw for _, avg, raw in list(averaged.values())[1:])  # a separate copy, not the module
    assert average_model(EMAWeightAveraging()) is None  # before fit


def test_published_callback_metrics_stay_until_overwritten_and_reach_on_train_end(probed):
    at_start = probed.seen["metric_at_start"]  # at the start of the batch after the one that reached the step
    assert at_start[0] is None and at_start[1] is None
    assert at_start[2] == pytest.approx(0.5) and at_start[3] == pytest.approx(0.7)
    metrics = probed.trainer.callback_metrics
    assert "train/loss" in metrics
    assert float(metrics["quality/x"]) == pytest.approx(0.2) and float(metrics["quality/end"]) == 1.5
    assert metrics["quality/x"].dtype == torch.float64


class StartStep(L.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.step, self.epoch = trainer.global_step, trainer.current_epoch


def test_loop_state_at_makes_fit_continue_at_that_step_and_epoch(probed, tmp_path):
    """``ncsn.tools.convert`` writes the loop counters of a run that took N steps; Lightning must resume there."""
    ckpt = torch.load(probed.out / "last.ckpt", weights_only=False)
    ckpt["loops"] = loop_state_at(7, 2)
    torch.save(ckpt, tmp_path / "at7.ckpt")
    start = StartStep()
    trainer = L.Trainer(max_steps=9, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[start])
    trainer.fit(OneParameter(), ckpt_path=tmp_path / "at7.ckpt")
    assert (start.step, start.epoch) == (7, 2) and trainer.global_step == 9  # 2 more steps, not 9 or 5
    assert trainer.fit_loop.epoch_loop._batches_that_stepped == 9  # the private counter it sets


class FakeQualityPasses(L.Callback):
    """A sample-grid stand-in: a 'quality pass' with a given value at given steps (``quality_history`` + the value
    published in callback_metrics), as ``SampleGridCallback`` does."""

    def __init__(self, values: dict[int, float]) -> None:
        self.values = values
        self.quality_history: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        value = self.values.get(trainer.global_step)
        if value is not None:
            self.quality_history.append({"step": trainer.global_step, "quality/x": value})
            publish_callback_metrics(trainer, {"quality/x": value})


def test_best_quality_checkpoint_records_the_step_of_the_best_pass(tmp_path):
    best = BestQualityCheckpoint(dirpath=tmp_path, monitor="quality/x")
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0,
                        callbacks=[FakeQualityPasses({1: 0.9, 2: 0.4, 3: 0.6}), best])
    trainer.fit(OneParameter())
    assert best.best_step == 2 and float(best.best_model_score) == pytest.approx(0.4)  # step 3 was worse
    assert torch.load(tmp_path / "best.ckpt", weights_only=False)["global_step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt"]
