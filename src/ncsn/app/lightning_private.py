"""Every use of Lightning's private API, in one place (Lightning 2.6 has no public way to do these).

Each function wraps one private name and is pinned by ``tests/test_lightning_rules.py``: a Lightning upgrade
that renames or changes one of them fails a test there instead of silently skipping a checkpoint or a quality
value. Elsewhere the code uses Lightning's public API only (``ncsn.app.module.ScoreModel._logging_step`` rebuilds
one more private rule, ``LoggerConnector.should_update_logs``, from public state; pinned in the same file).

* ``ModelCheckpoint``'s saving steps (``_should_skip_saving_checkpoint``, ``_monitor_candidates``,
  ``_save_topk_checkpoint``, ``_save_last_checkpoint``): our checkpoints save at moments Lightning's triggers
  do not offer (after a quality pass, at the very end of training) through ModelCheckpoint's own saving path,
  so that ``best_model_score``, ``last_model_path``, the loggers' ``after_save_checkpoint``,
  ``save_weights_only`` and ``save_last="link"`` behave as at one of its own saves.
* ``WeightAveraging._average_model``: the averaged copy of the module (no public accessor).
* the fit loop's progress counters (``_batches_that_stepped`` and the progress trackers): a checkpoint made
  outside Lightning (``ncsn.tools.convert``) that ``Trainer.fit(ckpt_path=...)`` continues at a given step.
* ``WandbLogger._wandb_init``: the arguments it will pass to ``wandb.init`` (one it always passes,
  ``anonymous=None``, makes wandb warn; pinned by ``tests/test_train_app.py``).
* ``Trainer.callback_metrics`` is public to read; writing into the dict it returns is not: Lightning keeps
  that dict between steps and only adds to it. ``LightningModule.log`` cannot be called from ``on_train_end``,
  where the final quality pass runs, so the pass's values are put there directly.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint, WeightAveraging

__all__ = ["attached_trainer", "average_model", "drop_unset_wandb_init_setting", "loop_state_at",
           "monitor_candidates", "publish_callback_metrics", "save_last", "save_top_k", "should_skip_saving"]


def attached_trainer(obj: Any) -> Any | None:
    """The Trainer a LightningModule or a callback (progress bar) is attached to, or None. Public: their
    ``trainer`` property, which raises when there is none (RuntimeError for a module, TypeError for a progress
    bar) instead of reading their private ``_trainer``."""
    try:
        return obj.trainer
    except (RuntimeError, TypeError):
        return None


def should_skip_saving(checkpoint: ModelCheckpoint, trainer: Any) -> bool:
    """ModelCheckpoint's own rule: no save in a sanity check, ``fast_dev_run``, outside ``fit``, or a second
    time at the step it last saved at."""
    return checkpoint._should_skip_saving_checkpoint(trainer)


def monitor_candidates(checkpoint: ModelCheckpoint, trainer: Any) -> dict[str, torch.Tensor]:
    """A copy of ``trainer.callback_metrics`` plus ``epoch`` and ``step``: what ModelCheckpoint compares and
    formats file names with."""
    return checkpoint._monitor_candidates(trainer)


def save_top_k(checkpoint: ModelCheckpoint, trainer: Any, candidates: Mapping[str, torch.Tensor]) -> None:
    """ModelCheckpoint's top-k save: compares ``candidates[monitor]`` with the best so far and saves (and
    updates ``best_model_score`` / ``best_model_path``) only on improvement; without a monitor: always."""
    checkpoint._save_topk_checkpoint(trainer, dict(candidates))


def save_last(checkpoint: ModelCheckpoint, trainer: Any, candidates: Mapping[str, torch.Tensor]) -> None:
    """ModelCheckpoint's ``last.ckpt`` save (a copy, or a link with ``save_last="link"``)."""
    checkpoint._save_last_checkpoint(trainer, dict(candidates))


def average_model(callback: WeightAveraging) -> torch.optim.swa_utils.AveragedModel | None:
    """The ``AveragedModel`` of a weight-averaging callback (None before ``setup("fit")``)."""
    return callback._average_model


def publish_callback_metrics(trainer: Any, values: Mapping[str, float]) -> None:
    """Make ``values`` part of ``trainer.callback_metrics`` (as float64 tensors) from any hook,
    ``on_train_end`` included: ModelCheckpoint's monitor, ``metrics.json`` and the sweep's optimized metric read
    them there."""
    trainer.callback_metrics.update({k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()})


def drop_unset_wandb_init_setting(logger: Any, key: str) -> None:
    """Remove ``key`` from the arguments a ``WandbLogger`` will pass to ``wandb.init`` when it is None."""
    if logger._wandb_init.get(key, "set") is None:
        logger._wandb_init.pop(key)


def loop_state_at(step: int, epoch: int) -> dict[str, Any]:
    """Lightning's loop counters (a checkpoint's ``loops``) for a run that has taken ``step`` optimizer steps
    and finished ``epoch`` epochs, at an epoch boundary: ``Trainer.fit(ckpt_path=...)`` continues at global step
    ``step`` with a fresh pass over the data (epoch index ``epoch``)."""
    import lightning as L

    silenced = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in silenced]
    for logger in silenced:
        logger.setLevel(logging.ERROR)
    try:
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
    finally:
        for logger, level in zip(silenced, levels, strict=True):
            logger.setLevel(level)
    epoch_loop = trainer.fit_loop.epoch_loop
    optimizer_progress = epoch_loop.automatic_optimization.optim_progress.optimizer
    optimizer_progress.step.total.ready = optimizer_progress.step.total.completed = step
    zero_grad = optimizer_progress.zero_grad.total
    zero_grad.ready = zero_grad.started = zero_grad.completed = step
    batches = epoch_loop.batch_progress.total
    batches.ready = batches.started = batches.processed = batches.completed = step
    epoch_loop._batches_that_stepped = step
    for counters in (trainer.fit_loop.epoch_progress.total, trainer.fit_loop.epoch_progress.current):
        counters.ready = counters.started = counters.processed = counters.completed = epoch
    return {"fit_loop": trainer.fit_loop.state_dict(), "validate_loop": trainer.validate_loop.state_dict(),
            "test_loop": trainer.test_loop.state_dict(), "predict_loop": trainer.predict_loop.state_dict()}
