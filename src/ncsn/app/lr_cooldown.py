"""A linear learning-rate cooldown over the end of the run's budget, counted in steps or in wall-clock time.

A run that stops at ``trainer.max_time`` (the CPU recipe) cannot use a step-indexed decay: the step at which the
time runs out depends on the machine. :class:`LRCooldown` multiplies the learning rate of every parameter group by

    factor = max(min_factor, min(1, (1 − p) / fraction))

where ``p`` ∈ [0, 1] is the share of the budget spent before the step: the larger of ``global_step`` over the run's
steps (``trainer.estimated_stepping_batches``: ``max_steps`` or ``max_epochs``) and the time elapsed over
``max_time`` (Lightning's ``Timer``, the callback that stops the run). So the rate is the scheduler's until the last
``fraction`` of the budget, then falls linearly to ``min_factor`` (0: to zero) where the run stops, on a fast
machine and on a slow one alike (warmup-stable-decay).

* **The scheduler keeps its own values.** The factor is applied just before each optimizer step and undone just
  after it (``torch.optim`` step hooks), so a chainable scheduler (the recipes' linear warm-up) computes from
  unscaled values and ``LearningRateMonitor``'s ``lr-*`` shows the scheduler's rate; the step's rate is that times
  ``train/lr_factor`` (logged on the logging steps).
* **DDP:** under ``max_time`` rank 0's ``p`` is broadcast each step (the ranks' clocks differ a little), so every
  rank steps alike; a step budget needs no collective (the step is the same on every rank).
* **Resume:** nothing to save; ``p`` comes from the step and the Timer, which Lightning restores from the
  checkpoint (a resume with another ``max_time`` re-times the cooldown to the new budget).
"""

from __future__ import annotations

import math

import lightning as L
import torch
from lightning.pytorch.callbacks import Timer

from ncsn.app.module import is_logging_step
from ncsn.errors import ConfigError


def cooldown_factor(spent: float, fraction: float, min_factor: float = 0.0) -> float:
    """The learning-rate multiplier when the share ``spent`` ∈ [0, 1] of the budget is used."""
    return max(min_factor, min(1.0, (1.0 - spent) / fraction))


def budget_spent(global_step: int, total_steps: float, timer: Timer | None) -> float:
    """The share of the run's budget spent before this step: ``global_step`` over ``total_steps`` (the run's
    ``estimated_stepping_batches``), or time over ``max_time`` (``timer``, Lightning's ``Timer``, present when
    ``max_time`` is set), whichever is further along (0 without either)."""
    spent = 0.0
    if math.isfinite(total_steps) and total_steps > 0:
        spent = global_step / total_steps
    left = timer.time_remaining() if timer is not None else None
    if left is not None:
        elapsed = timer.time_elapsed()
        spent = max(spent, elapsed / max(elapsed + left, 1e-9))
    return min(max(spent, 0.0), 1.0)


class LRCooldown(L.Callback):
    """Scale the learning rate down linearly over the last ``fraction`` of the budget, to ``min_factor``."""

    def __init__(self, fraction: float = 0.3, min_factor: float = 0.0) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ConfigError(f"callbacks.lr_cooldown.fraction={fraction}: give the share of the run to cool "
                              "down over, in (0, 1] (e.g. 0.3: the last 30 %)")
        if not 0.0 <= min_factor <= 1.0:
            raise ConfigError(f"callbacks.lr_cooldown.min_factor={min_factor}: give the final learning-rate "
                              "multiplier, in [0, 1] (0: down to zero)")
        self.fraction = float(fraction)
        self.min_factor = float(min_factor)
        self.factor = 1.0
        self._total_steps = math.inf
        self._timer: Timer | None = None
        self._handles: list = []
        self._saved: list[tuple[dict, object]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._remove_hooks()
        self._total_steps = trainer.estimated_stepping_batches
        self._timer = next((cb for cb in trainer.callbacks if isinstance(cb, Timer)), None)
        for optimizer in trainer.optimizers:
            self._handles.append(optimizer.register_step_pre_hook(self._scale))
            self._handles.append(optimizer.register_step_post_hook(self._restore))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        spent = budget_spent(trainer.global_step, self._total_steps, self._timer)
        if self._timer is not None and trainer.world_size > 1:  # steps agree on every rank; clocks do not
            spent = trainer.strategy.broadcast(spent, src=0)
        self.factor = cooldown_factor(spent, self.fraction, self.min_factor)
        if is_logging_step(trainer):
            pl_module.log("train/lr_factor", self.factor)

    def _scale(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        self._saved = [(group, group["lr"]) for group in optimizer.param_groups]
        if self.factor == 1.0:
            return
        for group, lr in self._saved:
            if isinstance(lr, torch.Tensor):
                group["lr"] = lr.clone().mul_(self.factor)
            else:
                group["lr"] = lr * self.factor

    def _restore(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        for group, lr in self._saved:
            group["lr"] = lr
        self._saved = []

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._remove_hooks()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()

    def __getstate__(self) -> dict:  # ddp_spawn pickles the callbacks: hook handles stay behind
        state = self.__dict__.copy()
        state["_handles"], state["_saved"], state["_timer"] = [], [], None
        return state
