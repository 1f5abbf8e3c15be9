"""The EMA of the weights: Lightning's ``WeightAveraging`` with the module always holding the raw weights.

:class:`EMA` takes the arguments of Lightning's ``EMAWeightAveraging`` (``decay``, ``update_every_n_steps``,
``update_starting_at_step``, ``device``, ``use_buffers``) and differs from it where this project saves,
resumes, validates and runs under DDP:

* **The module never holds the average.** Lightning swaps the average into the module for validation and
  copies it in at the end of training. Then a checkpoint written at such a moment (a SIGUSR1 pre-emption save
  can come mid-validation) has the two weight sets reversed, validation judges an average that early in a run
  is still mostly the initial network, and the raw weights are lost after fit. Here the module always holds the
  weights being trained, so every checkpoint, whenever it is written, has ``state_dict`` = EMA and
  ``current_model_state`` = raw, and validation (``val/loss``, the collapse check) measures the trained weights.
  The average's own validation loss is logged beside it as ``val_ema/loss`` (same data, same noise).
* **Picklable and fast** (``ddp_spawn`` pickles the callbacks): the EMA update is a module-level foreach
  function, not the local closure ``torch.optim.swa_utils.get_ema_avg_fn`` returns.
* **Raw weights in ``state_dict`` before the EMA has started.** Until the first update
  (``update_starting_at_step``) the average is the initial random network; checkpoints hold the raw weights
  as ``state_dict`` then, so sampling from them does not draw from an untrained network.

:func:`averaged_module` (sample grid, quality metric, FID) gives the average once it has started.
A resume with EMA switched off (``callbacks.ema=null``) continues from ``current_model_state``
(``ncsn.app.module.ScoreModel.on_load_checkpoint``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging

from ncsn.app.lightning_private import average_model
from ncsn.errors import ConfigError

log = logging.getLogger("ncsn")


def ema_update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor, *,
               decay: float) -> None:
    """One EMA step over lists of tensors, in place: ``averaged ← decay · averaged + (1 − decay) · current``, as
    one foreach kernel per dtype group (``AveragedModel``'s ``multi_avg_fn``; its per-tensor ``avg_fn`` path
    costs a few Python ops per tensor every step). Integer buffers are copied."""
    if torch.is_floating_point(averaged[0]) or torch.is_complex(averaged[0]):
        torch._foreach_lerp_(averaged, current, 1.0 - decay)
    else:
        for a, c in zip(averaged, current, strict=True):
            a.copy_(c)


def ema_started(callback: WeightAveraging) -> bool:
    """Whether the callback's average holds at least one update (before that it is the initial network)."""
    average = average_model(callback)
    return average is not None and int(average.n_averaged) > 0


def weight_averaging(trainer: L.Trainer) -> WeightAveraging | None:
    """The trainer's weight-averaging callback (this module's :class:`EMA` or any Lightning ``WeightAveraging``),
    or None."""
    return next((cb for cb in trainer.callbacks if isinstance(cb, WeightAveraging)), None)


@contextlib.contextmanager
def on_device(module: L.LightningModule, device: torch.device | str) -> Iterator[L.LightningModule]:
    """``module`` on ``device`` inside the ``with`` block, back where it was after it (also on an error).

    ``module.sample`` draws its first noise on ``module.device`` and runs the network where its weights are: both
    must be ``device`` (the one the caller's generator is made on). A module already there is used as it is; one
    kept elsewhere (an EMA average with ``callbacks.ema.device=cpu`` on a GPU run) is moved there with ``.to`` for
    the block and moved back to its weights' device afterwards (the Parameter objects are kept, so the EMA goes on
    updating the same tensors)."""
    device = torch.device(device)
    weights = next(module.parameters(), None)
    home = module.device if weights is None else weights.device
    if module.device == device and home == device:
        yield module
        return
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)


@contextlib.contextmanager
def sampling_module(trainer: L.Trainer, pl_module: L.LightningModule) -> Iterator[L.LightningModule]:
    """:func:`averaged_module` on the device the run trains on (``pl_module.device``) for the ``with`` block: what
    the sample-grid and FID passes sample with. An average kept on another device (``callbacks.ema.device=cpu``)
    is moved to the training device for the pass and back after it (:func:`on_device`), so the pass samples as fast
    as without the option and the average holds no GPU memory between passes."""
    with on_device(averaged_module(trainer, pl_module), pl_module.device) as module:
        yield module


def averaged_module(trainer: L.Trainer, pl_module: L.LightningModule) -> L.LightningModule:
    """The module to sample and score with: the EMA copy once the average has started (``n_averaged > 0``;
    before that the copy is the initial random network), else ``pl_module`` itself (raw weights, or no EMA).
    Never swaps weights: ``pl_module`` keeps the raw ones."""
    callback = weight_averaging(trainer)
    if callback is not None and ema_started(callback):
        return average_model(callback).module
    return pl_module


class EMA(WeightAveraging):
    """Exponential moving average of the weights (see the module docstring).

    Args:
        decay: the EMA decay (0.999 in NCSNv2).
        update_every_n_steps: update the average every N optimizer steps.
        update_starting_at_step: first optimizer step (0-based) that updates the average (None: from the first).
        device: where the average lives (default: with the module). Elsewhere (``cpu`` on a GPU run, to save GPU
            memory) ``val_ema/loss`` is not computed (one info line says so: the average would need the batches
            moved to it and a CPU pass over the validation set); the sample-grid and FID passes move the average to
            the training device for the pass and back after it (:func:`sampling_module`).
        use_buffers: average the buffers too.
        validate: also compute the average's validation loss, logged as ``val_ema/loss``.
    """

    def __init__(self, decay: float = 0.999, update_every_n_steps: int = 1,
                 update_starting_at_step: int | None = None, device: Any = None, use_buffers: bool = True,
                 validate: bool = True) -> None:
        if not 0.0 <= float(decay) <= 1.0:
            raise ConfigError(f"callbacks.ema.decay must be in [0, 1] (got {decay})")
        if int(update_every_n_steps) != update_every_n_steps or update_every_n_steps < 1:
            raise ConfigError(f"callbacks.ema.update_every_n_steps must be a whole number >= 1 (got "
                              f"{update_every_n_steps})")
        super().__init__(device=device, use_buffers=use_buffers,
                         multi_avg_fn=functools.partial(ema_update, decay=float(decay)))
        self.decay = float(decay)
        self.update_every_n_steps = int(update_every_n_steps)
        self.update_starting_at_step = update_starting_at_step
        self.validate = validate
        self._val_sum: torch.Tensor | None = None
        self._val_count: torch.Tensor | None = None
        self._said_elsewhere = False

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        if step_idx is None:
            return False
        started = self.update_starting_at_step is None or step_idx >= self.update_starting_at_step
        return started and self.update_every_n_steps > 0 and step_idx % self.update_every_n_steps == 0

    # --------------------------------------------------------------------- the module keeps the raw weights
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Keep the raw weights in the module (Lightning copies the average in here)."""

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """No swap: validation measures the weights being trained. Starts the average's own validation sums."""
        self._val_sum = self._val_count = None
        if not (self.validate and ema_started(self) and hasattr(pl_module, "validation_loss")):
            return
        where = next(average_model(self).module.parameters()).device
        if where != pl_module.device:
            if trainer.is_global_zero and not self._said_elsewhere:
                log.info("val_ema/loss is not computed: the EMA average lives on %s (callbacks.ema.device), the "
                         "validation batches on %s", where, pl_module.device)
            self._said_elsewhere = True
            return
        self._val_sum = torch.zeros((), dtype=torch.float64, device=pl_module.device)
        self._val_count = torch.zeros((), dtype=torch.float64, device=pl_module.device)

    @torch.no_grad()
    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._val_sum is None:
            return
        average = average_model(self).module
        was_training = average.training
        average.eval()
        out = pl_module.validation_loss(batch, batch_idx, model=average)  # the module's data and noise
        average.train(was_training)
        self._val_sum += out.level_sum.sum().double()
        self._val_count += out.level_count.sum().double()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._val_sum is None:
            return
        total = trainer.strategy.reduce(torch.stack([self._val_sum, self._val_count]), reduce_op="sum")
        loss_sum, count = total.tolist()  # one host sync per validation
        self._val_sum = self._val_count = None
        if count > 0:
            pl_module.log("val_ema/loss", loss_sum / count, sync_dist=True,
                          rank_zero_only=True)  # reduced above: no 2nd collective

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
                           ) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if average_model(self) is not None and not ema_started(self):
            checkpoint["state_dict"] = checkpoint["current_model_state"]
