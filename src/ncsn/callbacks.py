"""Callbacks that Lightning does not ship: the sample-grid callback, and the EMA helper it relies on."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torchvision.utils import make_grid, save_image

from ncsn.data.transforms import to_image_range
from ncsn.ema import averaged_module
from ncsn.samplers import build_plan, describe_sampler

log = logging.getLogger("ncsn")


def image_grid(samples: torch.Tensor, nrow: int | None = None) -> torch.Tensor:
    """A [C, H, W] grid in [0, 1] of model-range image samples (a square grid by default)."""
    nrow = nrow or max(1, round(samples.shape[0] ** 0.5))
    return make_grid(to_image_range(samples.detach().float().cpu()), nrow=nrow, padding=2, pad_value=1.0)


def scatter_image(points: torch.Tensor, size: int = 256, extent: float = 10.0) -> torch.Tensor:
    """A [1, size, size] image of 2-D samples (dark dots on white), for toy data."""
    img = torch.ones(1, size, size)
    pts = points.detach().float().cpu()
    ij = ((pts + extent) / (2 * extent) * (size - 1)).round().long()
    keep = ((ij >= 0) & (ij < size)).all(dim=1)
    ij = ij[keep]
    img[0, size - 1 - ij[:, 1], ij[:, 0]] = 0.0
    return img


class SampleGridCallback(L.Callback):
    """Every ``every_n_steps`` training steps and at the end of training, on rank zero: draw ``num_samples``
    samples with the run's sampler (``sampler=ald|pc|cas``; the EMA weights once EMA has started) from a fixed
    seed, log its network evaluations per sample as ``samples/nfe``, and from that one pass

    * save the grid of the first ``grid_size`` as ``<run dir>/samples/step_XXXXXXX.png`` and log it to every
      attached logger as ``samples/grid`` (a ``wandb.Image`` for W&B, an image for TensorBoard);
    * with ``quality`` on, score all of them with the dataset's built-in sample-quality metric
      (``ncsn.metrics.quality_metric_for``: the kernel distance in the digit classifier's features on MNIST,
      the energy distance on the toy mixture, KID in Inception features (or pooled pixels) on other images) and
      log its ``quality/*`` values to every logger at that step. Rank zero broadcasts the values, so on EVERY rank
      they are in ``trainer.callback_metrics`` at that step (``metrics.json``, ``optimized_metric`` and
      ``ModelCheckpoint(monitor="quality/...")`` see them); the whole curve is in :attr:`quality_history`.

    ``sampler`` overrides the module's sampler settings for these passes (e.g. fewer steps). The metric's real
    side (reference features, floors) is computed once, at the first pass. ``inception_weights`` (the setting
    ``paths.inception_weights``, shared with sample.py) is the standard Inception's weights file for non-digit
    images.
    """

    def __init__(
        self,
        every_n_steps: int = 5000,
        num_samples: int = 64,
        seed: int = 0,
        on_train_end: bool = True,
        sampler: dict | None = None,
        dirname: str = "samples",
        grid_size: int | None = 64,
        quality: bool = True,
        inception_weights: str | None = None,
    ) -> None:
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.seed = seed
        self.at_train_end = on_train_end
        self.sampler = dict(sampler or {})
        self.dirname = dirname
        self.grid_size = grid_size
        self.quality = quality
        self.inception_weights = inception_weights or None
        self._metric = None
        self._metric_built = False
        #: the quality values of every pass so far: [{"step": ..., "quality/...": ...}, ...]
        self.quality_history: list[dict] = []
        self._last_step = -1

    def _out_dir(self, trainer: L.Trainer) -> Path:
        return Path(trainer.default_root_dir) / self.dirname

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0:
            self.make_grid(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_train_end:
            self.make_grid(trainer, pl_module)

    def quality_metric(self, trainer: L.Trainer, pl_module: L.LightningModule):
        """The dataset's sample-quality metric (built once; None when off or the data has none)."""
        if self.quality and not self._metric_built:
            from ncsn.metrics import quality_metric_for

            self._metric_built = True
            datamodule = getattr(trainer, "datamodule", None)
            self._metric = quality_metric_for(datamodule, num_samples=self.num_samples, device=pl_module.device,
                                              inception_weights=self.inception_weights)
            if self._metric is not None:
                log.info("sample quality: %s, %d samples every %s steps: %s", self._metric.name, self.num_samples,
                         self.every_n_steps or "(end only)", self._metric.description)
        return self._metric

    def make_grid(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path | None:
        """One pass (called on every rank at the same step): rank zero samples, saves and logs the grid and scores
        the samples; then every rank gets the quality values (one broadcast). Returns the grid's path (rank 0)."""
        step = trainer.global_step
        if step == self._last_step:
            return None
        self._last_step = step
        path, values = self._sample_and_score(trainer, pl_module, step) if trainer.is_global_zero else (None, None)
        if self.quality and trainer.world_size > 1:
            values = trainer.strategy.broadcast(values, src=0)
        if values:
            self.quality_history.append({"step": step, **values})
            trainer.callback_metrics.update({k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()})
        return path

    def _sample_and_score(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int):
        module = averaged_module(trainer, pl_module)
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        samples = module.sample(self.num_samples, generator=generator, **self.sampler)
        settings = module.sampling_settings(**self.sampler)
        nfe = build_plan(module.sigmas, settings).nfe
        log.info("step %d: %d samples with %s, %d network evaluations each", step, self.num_samples,
                 describe_sampler(settings), nfe)
        for logger in trainer.loggers:
            logger.log_metrics({"samples/nfe": float(nfe)}, step=step)
        shown = samples[: self.grid_size] if self.grid_size else samples
        grid = scatter_image(shown) if samples.ndim == 2 else image_grid(shown)
        out_dir = self._out_dir(trainer)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"step_{step:07d}.png"
        tmp = path.with_suffix(".tmp.png")
        save_image(grid, tmp)
        os.replace(tmp, path)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="samples/grid", images=[str(path)], step=step, caption=[f"step {step}"])
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("samples/grid", grid, global_step=step)
        return path, self._score(trainer, pl_module, samples, step)

    def _score(self, trainer: L.Trainer, pl_module: L.LightningModule, samples: torch.Tensor,
               step: int) -> dict[str, float] | None:
        metric = self.quality_metric(trainer, pl_module)
        if metric is None:
            return None
        values = metric(samples if samples.ndim == 2 else to_image_range(samples.float()))
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)
        log.info("step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
        return values


class SigmaLossChart(L.Callback):
    """On rank zero: the validation loss against σ (``ScoreModel.val_per_level``) as one W&B line chart
    ``val/loss_vs_sigma`` with a line per charted validation (the last ``max_lines``), so the per-σ loss reads as
    one picture instead of a scalar per level. W&B keeps every chart as a Table file, so it is charted at a
    bounded rate: at the first validation, then at the first one at least ``every_n_steps`` after the last
    chart (``<= 0``: every validation), and at the end of training with the last validation's curve: at most
    ``max_steps / every_n_steps + 2`` tables per run. Loggers other than W&B get nothing from it
    (``metrics.json`` keeps the last curve under ``per_sigma``)."""

    def __init__(self, max_lines: int = 8, every_n_steps: int = 10_000) -> None:
        self.max_lines = max_lines
        self.every_n_steps = int(every_n_steps)
        self._curves: list[dict] = []  # the charted ones
        self._unsent: dict | None = None  # the last validation's curve when it was not charted

    @rank_zero_only
    def on_validation_end(self, trainer, pl_module) -> None:
        curve = getattr(pl_module, "val_per_level", None)
        if trainer.sanity_checking or curve is None or (self._curves and self._curves[-1]["step"] == curve["step"]):
            return
        if self._curves and curve["step"] - self._curves[-1]["step"] < self.every_n_steps:
            self._unsent = curve
            return
        self._chart(trainer, curve)

    @rank_zero_only
    def on_train_end(self, trainer, pl_module) -> None:
        if self._unsent is not None:
            self._chart(trainer, self._unsent)

    def _chart(self, trainer, curve: dict) -> None:
        self._unsent = None
        self._curves = [*self._curves, curve][-self.max_lines:]
        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not wandb_loggers:
            return
        import wandb

        xs, ys, keys = [], [], []
        for c in self._curves:
            pairs = [(s, v) for s, v in zip(c["sigma"], c["loss"]) if v is not None]
            xs.append([s for s, _ in pairs])
            ys.append([v for _, v in pairs])
            keys.append(f"step {c['step']}")
        chart = wandb.plot.line_series(xs=xs, ys=ys, keys=keys, title="validation loss per noise level",
                                       xname="sigma")
        for logger in wandb_loggers:
            logger.log_metrics({"val/loss_vs_sigma": chart}, step=trainer.global_step)


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

        from ncsn.provenance import run_info

        self.dirpath.mkdir(parents=True, exist_ok=True)
        (self.dirpath / "config.yaml").write_text(yaml.safe_dump(self.config, sort_keys=False))
        (self.dirpath / "run_info.json").write_text(json.dumps(run_info(), indent=2) + "\n")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["ncsn_config"] = self.config
        for logger in trainer.loggers:  # lets a resumed run continue the same W&B run
            if isinstance(logger, WandbLogger) and getattr(logger, "_experiment", None) is not None:
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
        import time

        now = time.perf_counter()
        if self._mark is not None and not self._saved and self._grid_steps(trainer) == self._grids:
            self._train_seconds += now - self._mark
        self._mark = now if start_next else None
        self._saved = False
        self._grids = self._grid_steps(trainer)

    def on_train_start(self, trainer, pl_module) -> None:
        import time

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
        import logging
        import time

        self._first_step_done = True
        if self._mark is None:
            return
        self._sync(pl_module.device)
        self._first_step_seconds = time.perf_counter() - self._mark
        self._mark = None  # the first step's segment is not counted ...
        self._next_segment(trainer)  # ... and the next one starts now
        if trainer.is_global_zero:
            logging.getLogger("ncsn").info(
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
        import time

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
            # checkpoints/best.ckpt (ncsn.best_checkpoint): the best quality pass's step and value, None without one
            "best_checkpoint": self._best_checkpoint(trainer),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".part")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, self.path)


    @staticmethod
    def _best_checkpoint(trainer) -> dict | None:
        from ncsn.best_checkpoint import BestQualityCheckpoint

        for cb in trainer.callbacks:
            if isinstance(cb, BestQualityCheckpoint) and cb.best_model_path:
                return {"path": cb.best_model_path, "metric": cb.monitor, "step": cb.best_step,
                        "value": float(cb.best_model_score)}
        return None

    @staticmethod
    def _quality(trainer) -> dict | None:
        for cb in trainer.callbacks:
            metric = getattr(cb, "_metric", None) if isinstance(cb, SampleGridCallback) else None
            if metric is not None:
                return {"metric": metric.name, "description": metric.description, "history": cb.quality_history}
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
