"""Callbacks that show what a run learns: the sample grid with its quality pass, and the per-σ loss chart.
(What a run writes beside its checkpoints is in ``ncsn.app.run_files``.)"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torchvision.utils import make_grid, save_image

from ncsn.app.ema import sampling_module
from ncsn.app.lightning_private import publish_callback_metrics
from ncsn.data.transforms import to_image_range
from ncsn.samplers import describe_sampler

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


def check_grid_settings(every_n_steps: int, num_samples: int, grid_size: int | None, quality: bool) -> None:
    """The sample grid's counts, each named as the user sets it (``callbacks.sample_grid.*``)."""
    from ncsn.errors import ConfigError

    key = "callbacks.sample_grid"
    least = 2 if quality else 1
    if isinstance(num_samples, bool) or int(num_samples) != num_samples or num_samples < least:
        why = " with the quality pass on (or set callbacks.sample_grid.quality=false)" if quality else ""
        raise ConfigError(f"{key}.num_samples must be a whole number >= {least}{why} (got {num_samples})")
    if isinstance(every_n_steps, bool) or int(every_n_steps) != every_n_steps or every_n_steps < 0:
        raise ConfigError(f"{key}.every_n_steps must be a whole number >= 0 (0: only at the end; got "
                          f"{every_n_steps})")
    if grid_size is not None and (isinstance(grid_size, bool) or int(grid_size) != grid_size or grid_size < 1):
        raise ConfigError(f"{key}.grid_size must be a whole number >= 1 or null (all samples; got {grid_size})")


class SampleGridCallback(L.Callback):
    """Every ``every_n_steps`` training steps and at the end of training, on rank zero: draw ``num_samples``
    samples with the run's sampler (``sampler=ald|pc|cas``; the EMA weights once EMA has started, on the training
    device even with ``callbacks.ema.device=cpu``: ``ncsn.app.ema.sampling_module``) from a fixed seed, log its
    network evaluations per sample as ``samples/nfe``, and from that one pass

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
        check_grid_settings(every_n_steps, num_samples, grid_size, quality)
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
        self._metric_info: dict | None = None  # {"metric": primary key, "description": ...} once built
        #: the quality values of every pass so far, those before a resume included (kept in the checkpoint):
        #: [{"step": ..., "quality/...": ...}, ...]
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
                self._metric_info = {"metric": self._metric.name, "description": self._metric.description}
                log.info("sample quality: %s, %d samples every %s steps: %s", self._metric.name, self.num_samples,
                         self.every_n_steps or "(end only)", self._metric.description)
        return self._metric

    def quality_record(self) -> dict | None:
        """``metrics.json``'s ``quality``: the metric's primary key and description and every pass of the run, also
        those made before a resume (None when no metric was built in this run or the one it resumes)."""
        if self._metric_info is None:
            return None
        return {**self._metric_info, "history": list(self.quality_history)}

    # The passes so far, the last pass's step (a resumed run does not repeat it) and the metric's name travel in
    # every checkpoint: plain lists, numbers and strings, which weights-only checkpoint loading accepts.
    def state_dict(self) -> dict:
        return {"quality_history": [dict(h) for h in self.quality_history], "last_step": self._last_step,
                "metric_info": self._metric_info}

    def load_state_dict(self, state_dict: dict) -> None:
        self.quality_history = [dict(h) for h in state_dict.get("quality_history", [])]
        self._last_step = int(state_dict.get("last_step", -1))
        self._metric_info = state_dict.get("metric_info")

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
            publish_callback_metrics(trainer, values)
        return path

    def _sample_and_score(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int):
        with sampling_module(trainer, pl_module) as module:  # on the training device, wherever the EMA lives
            generator = torch.Generator(device=module.device).manual_seed(self.seed)
            samples = module.sample(self.num_samples, generator=generator, **self.sampler)
            settings = module.sampling_settings(**self.sampler)
            nfe = module.sampling_plan(settings).nfe
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
