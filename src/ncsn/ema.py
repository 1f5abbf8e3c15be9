"""Lightning's EMA callback, fixed for how this project saves, resumes and samples.

:class:`EMA` is :class:`lightning.pytorch.callbacks.EMAWeightAveraging` (same constructor arguments) with
three differences:

* **No copy at the end of training.** Lightning copies the average into the module in ``on_train_end``; a
  ``last.ckpt`` written after fit (``ncsn.training.save_final_last_checkpoint``) then holds the EMA weights as
  both ``state_dict`` and ``current_model_state``, losing the raw weights (``sample.py use_ema=false`` would
  sample EMA weights, and a resume would restart the raw model from them). Here the module keeps its raw
  weights; every checkpoint has ``state_dict`` = EMA and ``current_model_state`` = raw.
* **No swap before the EMA has started.** Until the first update (``update_starting_at_step``) the average
  is still the initial random network (``n_averaged == 0``); Lightning swaps it in for validation anyway.
  Here validation uses the raw weights until then, and the swap back only happens if a swap was made.
* **Raw weights in ``state_dict`` before the EMA has started.** While ``n_averaged == 0`` the average is
  set to the raw weights whenever a checkpoint is saved, so ``state_dict`` is not the initial random
  network. (``AveragedModel`` copies the model on its first update anyway, so nothing changes after.)

``ncsn.callbacks.averaged_module`` (the sample grid) likewise uses the average only once it has started.
"""

from __future__ import annotations

import itertools
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EMAWeightAveraging, WeightAveraging


def ema_started(callback: WeightAveraging) -> bool:
    """Whether the callback's average holds at least one update (before that it is the initial network)."""
    average = callback._average_model
    return average is not None and int(average.n_averaged) > 0


class EMA(EMAWeightAveraging):
    """Exponential moving average of the weights; see the module docstring for how it differs from
    Lightning's ``EMAWeightAveraging`` (it takes the same arguments: ``decay``, ``update_starting_at_step``...)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._swapped = False

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Keep the raw weights in the module (Lightning copies the average in here)."""

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swapped = ema_started(self)
        if self._swapped:
            self._swap_models(pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._swapped:
            self._swap_models(pl_module)
            self._swapped = False

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
                           ) -> None:
        if self._average_model is not None and not ema_started(self):
            average = itertools.chain(self._average_model.module.parameters(), self._average_model.module.buffers())
            current = itertools.chain(pl_module.parameters(), pl_module.buffers())
            for avg, cur in zip(average, current):
                avg.data.copy_(cur.data)
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
