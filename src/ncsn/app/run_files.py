"""What a run writes beside its checkpoints, as Lightning callbacks: the run record (resolved config, versions,
the config inside every checkpoint), ``metrics.json`` (last metrics and the training speed) and the random-number
states that make a resumed run draw what an uninterrupted one would."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from ncsn.app.callbacks import SampleGridCallback

log = logging.getLogger("ncsn")


class RunRecordCallback(L.Callback):
    """Keeps a run reproducible and self-describing.

    * writes the resolved config (``config.yaml``) and the versions of torch / lightning / ncsn and the
      git commit (``run_info.json``) into the checkpoint directory at the start of fit (rank zero);
    * stores the resolved config in every checkpoint under ``ncsn_config`` so ``sample.py`` can rebuild
      the network, σ list, sampler settings and data value range from the checkpoint alone.
    """

    def __init__(self, config: dict, dirpath: str | os.PathLike) -> None:
        self.config = config
        self.dirpath = Path(dirpath)

    @rank_zero_only
    def on_fit_start(self, trainer, pl_module) -> None:
        import json

        import yaml

        from ncsn.app.provenance import run_info

        self.dirpath.mkdir(parents=True, exist_ok=True)
        (self.dirpath / "config.yaml").write_text(yaml.safe_dump(self.config, sort_keys=False))
        (self.dirpath / "run_info.json").write_text(json.dumps(run_info(), indent=2) + "\n")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["ncsn_config"] = self.config
        for logger in trainer.loggers:  # lets a resumed run continue the same W&B run
            if isinstance(logger, WandbLogger) and logger.version is not None:  # its run's id (or the resumed one)
                checkpoint["wandb_run_id"] = logger.version


class MetricsFileCallback(L.Callback):
    """Writes ``metrics.json`` in the run dir at the end of fit (rank zero), whatever loggers are attached:
    the last value of every logged metric, the global step, and the training speed. Sweep reports read it.

    ``train_seconds`` counts training only: the steps with their data loading, logging and EMA updates, not
    validation, checkpoint saves or sample grids, and not the first step of this fit; ``images_per_second`` is
    the images of the steps counted divided by it (None when no step after the first ran).
    ``first_step_seconds`` is the first training step of this fit alone (batch start to batch end, its GPU
    work included): with the fast path on it holds the ``torch.compile`` of the training step (and cuDNN
    autotuning), which would otherwise be spread over the rate. It is also logged once (INFO, ``ncsn``).
    ``wall_seconds`` is the whole time from the start of training to the end of fit.

    The timing adds no host/GPU sync at a step (only one after the first step, one at the start of each
    validation and one at the end of training): time is cut at this callback's hooks into segments, and a
    segment in which a checkpoint was saved or a sample grid was made is left out whole (and with it at most
    one step's own time)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._start: float | None = None
        self._start_step = 0
        self._samples = 0
        self._train_seconds = 0.0
        self._mark: float | None = None  # start of the segment being timed; None while not timing
        self._saved = False  # a checkpoint was saved in this segment
        self._grids: tuple = ()  # the sample-grid callbacks' last grid steps when this segment started
        self._in_validation = False
        self._first_step_seconds: float | None = None
        self._first_step_done = False

    @staticmethod
    def _grid_steps(trainer) -> tuple:
        return tuple(cb._last_step for cb in trainer.callbacks if isinstance(cb, SampleGridCallback))

    @staticmethod
    def _sync(device: torch.device) -> None:
        """Wait for the device's queued work, so that training work still running is timed as training."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elif device.type == "mps":
            torch.mps.synchronize()

    def _next_segment(self, trainer, start_next: bool = True) -> None:
        """End the segment being timed, counting it unless a checkpoint or a sample grid was made in it."""

        now = time.perf_counter()
        if self._mark is not None and not self._saved and self._grid_steps(trainer) == self._grids:
            self._train_seconds += now - self._mark
        self._mark = now if start_next else None
        self._saved = False
        self._grids = self._grid_steps(trainer)

    def on_train_start(self, trainer, pl_module) -> None:

        self._start = time.perf_counter()
        self._start_step = trainer.global_step
        self._samples = 0
        self._train_seconds = 0.0
        self._first_step_seconds = None
        self._first_step_done = False
        self._mark = None
        self._next_segment(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._next_segment(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._first_step_done:
            self._end_first_step(trainer, pl_module)
            return
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        self._samples += int(x.shape[0]) * trainer.world_size
        self._next_segment(trainer)

    def _end_first_step(self, trainer, pl_module) -> None:
        """The first step of this fit is timed on its own (one sync, so its GPU work is in it) and left out."""
        self._first_step_done = True
        if self._mark is None:
            return
        self._sync(pl_module.device)
        self._first_step_seconds = time.perf_counter() - self._mark
        self._mark = None  # the first step's segment is not counted ...
        self._next_segment(trainer)  # ... and the next one starts now
        if trainer.is_global_zero:
            log.info(
                "first training step took %.2f s (includes torch.compile / CUDA-graph capture when the fast path "
                "is on)", self._first_step_seconds)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._saved = True

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self._mark is None:
            return
        self._sync(pl_module.device)
        self._next_segment(trainer, start_next=False)
        self._in_validation = True

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._in_validation:
            self._in_validation = False
            self._next_segment(trainer)  # the validation segment is not timed (no mark): starts the next one

    def on_train_end(self, trainer, pl_module) -> None:
        if self._mark is not None:
            self._sync(pl_module.device)
        self._next_segment(trainer, start_next=False)

    @rank_zero_only
    def on_fit_end(self, trainer, pl_module) -> None:
        import json
        import math

        wall = time.perf_counter() - self._start if self._start is not None else float("nan")
        elapsed = self._train_seconds if self._start is not None else float("nan")
        metrics = {}
        for name, value in trainer.callback_metrics.items():
            v = float(value)
            metrics[name] = v if math.isfinite(v) else None
        record = {
            "global_step": trainer.global_step,
            "train_seconds": elapsed,
            "wall_seconds": wall,
            "train_steps": trainer.global_step - self._start_step,
            # the first step of this fit (compile, autotuning), not part of train_seconds / images_per_second
            "first_step_seconds": self._first_step_seconds,
            "images_per_second": self._samples / elapsed if elapsed and elapsed > 0 else None,
            "metrics": metrics,
            # the network-collapse warnings of the run (ncsn.diagnostics.collapse_warning), [] when healthy
            "warnings": list(getattr(pl_module, "health_warnings", [])),
            # the last validation's loss per noise level: {"step", "sigma", "loss" (None: no sample), "count"}
            "per_sigma": getattr(pl_module, "val_per_level", None),
            # the built-in sample-quality metric: its primary key (lower is better) and every pass's values
            "quality": self._quality(trainer),
            # checkpoints/best.ckpt (ncsn.app.best_checkpoint): the best quality pass's step and value, None without one
            "best_checkpoint": self._best_checkpoint(trainer),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".part")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, self.path)


    @staticmethod
    def _best_checkpoint(trainer) -> dict | None:
        """The best checkpoint's path, key, step and value. The value is None when Lightning holds no score for it:
        a run resumed into another output dir (``ckpt_path`` of an earlier run) keeps the earlier ``best.ckpt``'s
        path but not its score until a quality pass of its own."""
        from ncsn.app.best_checkpoint import BestQualityCheckpoint

        for cb in trainer.callbacks:
            if isinstance(cb, BestQualityCheckpoint) and cb.best_model_path:
                score = cb.best_model_score
                return {"path": cb.best_model_path, "metric": cb.monitor, "step": cb.best_step,
                        "value": None if score is None else float(score)}
        return None

    @staticmethod
    def _quality(trainer) -> dict | None:
        for cb in trainer.callbacks:
            record = cb.quality_record() if isinstance(cb, SampleGridCallback) else None
            if record is not None:
                return record
        return None


class RngStateCallback(L.Callback):
    """Saves the random-number states (torch CPU/CUDA, numpy, python) in every checkpoint and restores them
    on resume, so a resumed run draws the same noise levels, noise and data order as an uninterrupted one."""

    # Stored as tensors, lists and numbers only, so Lightning's weights_only checkpoint loading accepts them.
    def state_dict(self) -> dict:
        import random

        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        version, mt, gauss = random.getstate()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)},
            "python": {"version": version, "mt": list(mt), "gauss": gauss},
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        import random

        import numpy as np

        torch.set_rng_state(state_dict["torch"])
        n = state_dict["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
        p = state_dict["python"]
        random.setstate((p["version"], tuple(p["mt"]), p["gauss"]))
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])
