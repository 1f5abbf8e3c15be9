"""``FIDCallback``: log ``val/fid`` from samples of the model during training."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from ncsn.app.ema import sampling_module
from ncsn.errors import ConfigError
from ncsn.metrics.features import _custom_feature, _standard_feature
from ncsn.metrics.fid import _feed, build_fid_metric

__all__ = ["FIDCallback"]


class FIDCallback(L.Callback):
    """Log ``val/fid`` from samples of the model, during training.

    At the end of a validation epoch (not the sanity check) that comes at least ``every_n_steps`` training
    steps after the last FID (and at the first validation when ``on_first_validation``; ``every_n_steps <= 0``:
    every validation), rank zero draws ``num_samples`` images with
    ``pl_module.sample(batch, generator=torch.Generator(device).manual_seed(seed), **sampler)`` in chunks of
    ``batch_size``, takes ``num_real`` real images from ``trainer.datamodule.val_dataloader()`` (their
    features are computed once and cached), computes FID with ``feature``, broadcasts it to every rank and
    logs it as ``val/fid`` (on every rank, same value), so ``ModelCheckpoint(monitor="val/fid", mode="min")``
    works. ``self.history`` keeps ``(global_step, fid)``.

    EMA: samples come from the EMA's averaged model once it has started (``ncsn.app.ema.sampling_module``, as the
    sample grid and the quality pass: on the training device even with ``callbacks.ema.device=cpu``), from
    ``pl_module`` (the raw weights) before that or without EMA. No weights are ever swapped: ``pl_module``
    holds the raw weights throughout, whatever the callback order.

    Notes: ``trainer.callback_metrics`` keeps the last ``val/fid`` across validations where no FID is due, so
    with ``ModelCheckpoint(monitor="val/fid")`` either validate at the FID cadence (``every_n_steps=0``) or
    keep ``save_top_k=1``; the first validation computes FID by default because ModelCheckpoint raises when
    the monitored key is missing after validation has run. Other ranks wait in the broadcast while rank zero
    samples: keep the FID cost under the process group timeout (30 min by default). Rank zero samples with
    the plain LightningModule, so sharded strategies (FSDP, DeepSpeed stage 3) are not supported.

    ``at_train_end``: compute a last FID at the end of training (EMA weights once started) and send it to the loggers
    (Lightning allows no ``self.log`` there, so ModelCheckpoint doesn't see it).
    """

    def __init__(
        self,
        every_n_steps: int = 5000,
        num_samples: int = 1000,
        num_real: int = 1000,
        batch_size: int = 250,
        feature: int | str | nn.Module = 2048,
        inception_weights: str | os.PathLike | None = None,
        seed: int = 0,
        sampler: dict | None = None,
        on_first_validation: bool = True,
        at_train_end: bool = False,
        allow_download: bool | None = None,
        prog_bar: bool = True,
        name: str = "val/fid",
    ) -> None:
        for key, value in (("num_samples", num_samples), ("num_real", num_real), ("batch_size", batch_size)):
            if int(value) < 1 or (key != "batch_size" and int(value) < 2):
                raise ConfigError(
                    f"FIDCallback {key} must be >= {1 if key == 'batch_size' else 2}, got {value}"
                )
        if not isinstance(feature, nn.Module) and _standard_feature(feature) is None:
            _custom_feature(feature)  # a bad feature name fails here, not at the first validation
        self.every_n_steps = int(every_n_steps)
        self.num_samples = int(num_samples)
        self.num_real = int(num_real)
        self.batch_size = int(batch_size)
        self.feature = feature
        self.inception_weights = inception_weights
        self.seed = int(seed)
        self.sampler = dict(sampler or {})
        self.on_first_validation = on_first_validation
        self.at_train_end = at_train_end
        self.allow_download = allow_download
        self.prog_bar = prog_bar
        self.name = name
        self.history: list[tuple[int, float]] = []
        self.last_fid: float | None = None
        self._last_step: int | None = None
        self._metric: FrechetInceptionDistance | None = None
        self._num_real_seen = 0

    # ---- when -------------------------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._metric = None  # a new fit/validate may bring another validation set: recompute real features
        self._num_real_seen = 0

    def _due(self, step: int) -> bool:
        if self._last_step is None:
            return self.on_first_validation or step >= self.every_n_steps
        return step != self._last_step and step - self._last_step >= self.every_n_steps

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self._due(trainer.global_step):
            return
        value = self._compute_and_broadcast(trainer, pl_module)
        pl_module.log(self.name, value, prog_bar=self.prog_bar, sync_dist=trainer.world_size > 1)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.at_train_end or self._last_step == trainer.global_step:
            return
        value = self._compute_and_broadcast(trainer, pl_module)
        for logger in trainer.loggers:
            logger.log_metrics({self.name: value}, step=trainer.global_step)

    # ---- how --------------------------------------------------------------------------------------------

    def _compute_and_broadcast(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        value = None
        if trainer.is_global_zero:
            value = self.compute_fid(trainer, pl_module)
        value = float(trainer.strategy.broadcast(value, src=0))
        self._last_step = trainer.global_step
        self.last_fid = value
        self.history.append((trainer.global_step, value))
        return value

    def _real_source(self, trainer: L.Trainer) -> Any:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "val_dataloader"):
            return datamodule.val_dataloader()
        loaders = trainer.val_dataloaders
        if loaders is None:
            raise ConfigError(
                "FIDCallback needs real images: give the Trainer a datamodule with val_dataloader()"
            )
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0]
        return loaders

    def _fake_batches(self, module: L.LightningModule) -> Iterator[torch.Tensor]:
        generator = torch.Generator(device=module.device).manual_seed(self.seed)
        remaining = self.num_samples
        while remaining > 0:
            n = min(self.batch_size, remaining)
            yield module.sample(n, generator=generator, **self.sampler)
            remaining -= n

    def compute_fid(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        """FID of ``num_samples`` fresh samples (EMA weights once started) against the cached real features
        (this process only)."""
        device = pl_module.device
        with torch.inference_mode(), torch.autocast(device_type=device.type, enabled=False):
            if self._metric is None:
                self._metric = build_fid_metric(
                    self.feature,
                    inception_weights=self.inception_weights,
                    allow_download=self.allow_download,
                    reset_real_features=False,
                )
            metric = self._metric.to(device)
            metric.reset()  # fake features only; the real ones are kept
            if self._num_real_seen == 0:
                self._num_real_seen = _feed(
                    [(metric, {"real": True})],
                    self._real_source(trainer),
                    batch_size=self.batch_size,
                    device=device,
                    limit=self.num_real,
                )
                if self._num_real_seen < self.num_real:
                    rank_zero_warn(
                        f"FIDCallback: the validation set has {self._num_real_seen} images, fewer than "
                        f"num_real={self.num_real}; FID uses those"
                    )
            with sampling_module(trainer, pl_module) as module:  # on the training device, wherever the EMA lives
                _feed([(metric, {"real": False})], self._fake_batches(module), batch_size=self.batch_size,
                      device=device)
            if self._num_real_seen < 2:
                raise ConfigError("FIDCallback needs at least 2 real images from the validation dataloader")
            return float(metric.compute())

    # ---- checkpointing ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step, "history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = state_dict.get("last_step")
        self.history = [tuple(item) for item in state_dict.get("history", [])]
        self.last_fid = self.history[-1][1] if self.history else None

