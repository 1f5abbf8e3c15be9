"""The per-σ validation of ``ScoreModel`` (``ncsn.app.module``): fixed (level, noise) draws per validation
sample, one reduction per validation, the loss in fixed log-σ bins and the collapse metrics."""

from __future__ import annotations

import logging
from typing import Any

import torch

from ncsn.app.lightning_private import attached_trainer
from ncsn.diagnostics import health_metrics
from ncsn.losses import LossOutput, indexed_normal
from ncsn.sigmas import loss_by_sigma_bin

log = logging.getLogger("ncsn")

#: the fractional part of the golden ratio: the validation levels' low-discrepancy sequence
GOLDEN = 0.6180339887498949


class PerSigmaValidation:
    """Lightning's validation hooks of ``ScoreModel``. The host class provides ``num_scales``, ``sigmas``,
    ``val_seed``, ``loss_name``, ``loss_functions`` (the losses by name), ``weight_power``, ``score_fn``,
    ``_loss_weight`` (EDM's weight for a preconditioned network), ``_images``, ``collapse_check_after`` and
    ``health_warnings``, and is a ``LightningModule``."""

    def on_validation_epoch_start(self) -> None:
        self._val_sum = torch.zeros(self.num_scales, device=self.device)
        self._val_count = torch.zeros(self.num_scales, device=self.device)
        self._val_health = torch.zeros(2, device=self.device)  # zero-output loss sum, output mean-square sum
        self._val_batches = self._validation_batches()

    def _validation_batches(self) -> list[list[int]] | None:
        """The validation set indices of each batch this process loads (its dataloader's batch sampler, with
        Lightning's DistributedSampler under DDP); None without a trainer or a batch sampler."""
        if attached_trainer(self) is None:
            return None
        loaders = self.trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        batch_sampler = getattr(loader, "batch_sampler", None)
        return [list(b) for b in batch_sampler] if batch_sampler is not None else None

    def validation_indices(self, batch_idx: int, n: int) -> torch.Tensor:
        """The index in the whole validation set of each of the ``n`` samples of batch ``batch_idx`` (int64)."""
        batches = getattr(self, "_val_batches", None)
        if batches is not None and batch_idx < len(batches) and len(batches[batch_idx]) == n:
            return torch.as_tensor(batches[batch_idx], dtype=torch.int64)
        return torch.arange(batch_idx * n, (batch_idx + 1) * n)

    def validation_loss(self, batch: Any, batch_idx: int, model: Any = None) -> LossOutput:
        """The validation loss of ``model`` (default: this module, i.e. the weights being trained) on one
        batch. Each sample's (level, noise) pair is a function of its index j in the whole validation set only
        (``validation_indices``): level ⌊L · frac(j φ)⌋, φ the golden ratio (any number of samples covers the σ
        range evenly, and every level once there are a few times L), noise from ``indexed_normal(j)``. So every
        validation draws the same pairs, on 1 or N devices and with any batch size. The EMA callback calls it with
        the average, to compare on the same draws."""
        x = self._images(batch)
        index = self.validation_indices(batch_idx, x.shape[0])
        levels = ((index.double() * GOLDEN) % 1.0 * self.num_scales).long().clamp_(max=self.num_scales - 1)
        noise = indexed_normal(index, tuple(x.shape[1:]), self.val_seed).to(x.device, x.dtype)
        generator = torch.Generator(device=x.device).manual_seed(self.val_seed + int(index[0]))  # SSM projections
        model = self if model is None else model
        return self.loss_functions[self.loss_name](model.score_fn, x, self.sigmas, levels.to(x.device),
                                                   weight_power=self.weight_power, noise=noise,
                                                   generator=generator, **self._loss_weight())

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        out = self.validation_loss(batch, batch_idx)
        self._val_sum += out.level_sum
        self._val_count += out.level_count
        if out.zero_output_sum is not None:
            self._val_health += torch.stack([out.zero_output_sum, out.output_sq_sum])

    def on_validation_epoch_end(self) -> None:
        """Logs ``val/loss``, the collapse metrics and the per-σ losses in fixed log-σ bins
        (``val/loss_sigma_bin/<lo>-<hi>``, ``ncsn.sigmas.sigma_bin_key``: the same keys in every run, so a σ sweep
        overlays; only bins that hold a level that drew samples). Everything is summed over processes in ONE
        reduction and read to the host once; levels that drew no validation sample get no value (never a fake 0).
        The full per-level curve is kept in ``val_per_level``."""
        packed = torch.cat([self._val_sum, self._val_count, self._val_health])
        packed = self.trainer.strategy.reduce(packed, reduce_op="sum").double().cpu()
        level_sum, level_count = packed[:self.num_scales], packed[self.num_scales:2 * self.num_scales]
        health = packed[2 * self.num_scales:]
        total = float(level_count.sum())
        if total == 0:
            return
        val_loss = float(level_sum.sum()) / total
        metrics: dict[str, float] = {"val/loss": val_loss}
        if self.loss_name == "dsm":
            metrics.update(self._health_metrics(val_loss, *(float(h) / total for h in health)))
        per_level = [float(s / c) if c > 0 else None for s, c in zip(level_sum, level_count)]
        self.val_per_level = {"step": self.global_step, "sigma": self.sigmas.tolist(), "loss": per_level,
                              "count": [int(c) for c in level_count]}
        metrics.update(loss_by_sigma_bin(self.val_per_level["sigma"], level_sum.tolist(), level_count.tolist()))
        # Already reduced (the one strategy.reduce above) and equal on every rank: rank_zero_only=True turns
        # Lightning's per-key reduction into a no-op (one all_reduce per key otherwise), and sync_dist=True tells it
        # the values are process-wide (no per-key "sync_dist" warning). Every rank logs the same values, so
        # monitors (ModelCheckpoint, EarlyStopping) see them on every rank.
        self.log("val/loss", metrics.pop("val/loss"), prog_bar=True, sync_dist=True, rank_zero_only=True)
        self.log_dict(metrics, sync_dist=True, rank_zero_only=True)

    def _health_metrics(self, val_loss: float, zero_output: float, output_ms: float) -> dict[str, float]:
        """The collapse metrics of one validation (of the weights being trained, never the EMA's); the warning
        line is kept for metrics.json and logged once."""
        lr = float(self.trainer.optimizers[0].param_groups[0]["lr"]) if self.trainer.optimizers else None
        check = self.global_step >= self.collapse_check_after and not self.trainer.sanity_checking
        metrics, line = health_metrics(self.global_step, val_loss, zero_output, output_ms, lr, check)
        if line is not None:
            self.health_warnings.append(line)
            if self.trainer.is_global_zero:
                log.warning(line)
        return metrics
