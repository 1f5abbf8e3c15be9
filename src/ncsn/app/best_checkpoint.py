"""``BestQualityCheckpoint``: keep ``checkpoints/best.ckpt``, the checkpoint of the best sample-quality pass so far.

Lightning's own ``ModelCheckpoint`` (``monitor=<primary quality key>``, ``mode="min"``, ``save_top_k=1``,
``filename="best"``, no version counter, so a new best replaces ``best.ckpt`` and never becomes ``best-v1.ckpt``),
triggered by the quality passes of ``SampleGridCallback`` instead of a step or epoch interval: after each pass
(periodic or at the end of training) it runs ModelCheckpoint's own top-k save, which compares the value with the
best so far and saves only on improvement. The value is in ``trainer.callback_metrics`` on every rank (the sample
grid broadcasts it), so under DDP every rank takes the same decision. ModelCheckpoint callbacks run after the
others, so the pass of the same step has been scored when this runs.
"""

from __future__ import annotations

import logging

from lightning.pytorch.callbacks import ModelCheckpoint

from ncsn.app.lightning_private import monitor_candidates, save_top_k, should_skip_saving

__all__ = ["BestQualityCheckpoint"]

log = logging.getLogger("ncsn")


class BestQualityCheckpoint(ModelCheckpoint):
    """``monitor="auto"`` is replaced by the run's primary quality key when the run is built (``ncsn.app.train``,
    from ``ncsn.app.sweeps.run_quality_key``: what the sample grid's metric logs). :attr:`best_step` is the global step
    of ``best.ckpt`` (None before the first save); ``metrics.json`` records it with the value under
    ``best_checkpoint``. A quality pass that logs no value for :attr:`monitor` (a monitor set by hand to another
    key) saves nothing and says so in one warning line, once per run."""

    def __init__(self, dirpath: str | None = None, monitor: str = "auto", filename: str = "best",
                 mode: str = "min") -> None:
        super().__init__(dirpath=dirpath, monitor=monitor, filename=filename, mode=mode, save_top_k=1,
                         save_last=False, auto_insert_metric_name=False, enable_version_counter=False,
                         every_n_train_steps=0, every_n_epochs=0, save_on_train_epoch_end=False)
        self.best_step: int | None = None
        self._said_unlogged = False

    def _logged_by(self, trainer, passes: list[dict]) -> bool:
        """Whether this step's quality passes logged the monitored key; if not, one warning line (once)."""
        if any(self.monitor in values for values in passes):
            return True
        if trainer.is_global_zero and not self._said_unlogged:
            logged = sorted({k for values in passes for k in values if k != "step"})
            log.warning("best.ckpt is not written: the quality pass at step %d logged %s but not %s, the monitor of "
                        "callbacks.best_checkpoint; set callbacks.best_checkpoint.monitor=auto (or to one of those "
                        "keys)", trainer.global_step, ", ".join(logged) or "nothing", self.monitor)
        self._said_unlogged = True
        return False

    def _after_quality_pass(self, trainer) -> None:
        passes = [cb.quality_history[-1] for cb in trainer.callbacks if getattr(cb, "quality_history", None)]
        scored_now = [values for values in passes if values["step"] == trainer.global_step]
        if not scored_now or not self._logged_by(trainer, scored_now):
            return
        if self.monitor not in trainer.callback_metrics or should_skip_saving(self, trainer):
            return
        before = self.best_model_score
        save_top_k(self, trainer, monitor_candidates(self, trainer))
        if self.best_model_score is not before:  # saved: an improvement stores the new value (a new tensor)
            self.best_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._after_quality_pass(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        pass  # only quality passes trigger this checkpoint

    def on_train_end(self, trainer, pl_module) -> None:
        self._after_quality_pass(trainer)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "best_step": self.best_step}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.best_step = state_dict.get("best_step")
