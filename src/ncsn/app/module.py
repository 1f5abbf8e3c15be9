"""The LightningModule: weighted multi-σ DSM training, per-σ validation loss, and a sampling API.

The module owns the score network and the σ list (a buffer: it moves with the device and is saved in
every checkpoint). It knows nothing about Hydra; the app layer builds it from config with
``hydra.utils.instantiate(cfg.model)``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch import nn

from ncsn.app.lightning_private import attached_trainer
from ncsn.app.validation import PerSigmaValidation
from ncsn.diagnostics import grad_norm
from ncsn.errors import ConfigError, UserError
from ncsn.losses import LossOutput, dsm_loss, level_probabilities, sliced_score_matching_loss
from ncsn.nets import noise_input, score_function
from ncsn.perf import PerfRuntime, PerfSettings, graphed_sample, optimizer_kwargs, parameter_token
from ncsn.samplers import DEFAULT_INIT, build_plan, initial_samples, run_plan, sampler_settings
from ncsn.sigmas import validate_sigmas

log = logging.getLogger("ncsn")

LOSSES = {"dsm": dsm_loss, "ssm": sliced_score_matching_loss}

class NonFiniteLossError(UserError, RuntimeError):
    """Training produced a NaN or infinite loss."""


#: how training draws σ (``sigma_draw``)
SIGMA_DRAWS = ("levels", "log_uniform", "log_normal")


def is_logging_step(trainer: L.Trainer) -> bool:
    """Whether the loggers read this training step's metrics. Lightning's rule for the fit loop (its private
    ``LoggerConnector.should_update_logs``) from public trainer state: the (global_step + 1)-th step is a multiple
    of ``log_every_n_steps``, or training stops here."""
    every = trainer.log_every_n_steps
    return every > 0 and ((trainer.global_step + 1) % every == 0 or trainer.should_stop)


def check_optimizer(factory: Callable[..., torch.optim.Optimizer] | None) -> None:
    """Build the configured optimizer once on a dummy parameter, so that a bad setting (a negative learning rate,
    betas outside [0, 1)) is one line now instead of an error after the run has started."""
    if factory is None:
        return
    try:
        factory([nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"model.optimizer: {exc}; fix the model.optimizer settings") from exc


class ScoreModel(PerSigmaValidation, L.LightningModule):
    """A noise-conditional score model trained with denoising score matching.

    Args:
        net: the score network, ``net(x, levels)`` (see ``ncsn.nets``).
        sigmas: the decreasing noise levels [L].
        data_shape: the shape of one sample, e.g. [1, 28, 28] (used to draw initial samples).
        optimizer: a callable ``params -> Optimizer`` (Hydra ``_partial_: true``); Adam 1e-3 by default.
        scheduler: optional callable ``optimizer -> LRScheduler``, stepped every training step.
        sampler: the sampler and its settings (``conf/sampler/``; ``ncsn.samplers.sampler_settings``): ``name``
            ald (the paper's annealed Langevin; the default, also for checkpoints written before samplers had
            names), pc or cas, their settings, and init_low, init_high (initial samples are uniform on
            [init_low, init_high], [0, 1] for images as in the paper; pc and cas add σ_1 z).
        loss: "dsm" (the paper) or "ssm" (sliced score matching, for toy data).
        weight_power: p in λ(σ) = σ^p.
        val_seed: seed of the fixed noise used for validation, so val losses are comparable over time.
        nonfinite: what a NaN/inf training loss does: "raise" (stop with the step and σ level) or "skip"
            (skip that step and count it in ``train/skipped_steps``).
        perf: the fast path (``conf/perf/``, see ``ncsn.perf.PerfSettings``): bf16 autocast, channels_last,
            torch.compile, fused Adam, CUDA-graph sampling. ``enabled: auto`` turns it on when the module
            runs on a CUDA device; None (the default in Python) means off: exactly the plain fp32 path.
        collapse_check_after: from this global step on, every validation checks that the network has not
            collapsed (``ncsn.diagnostics.collapse_warning``) and warns in one line when it has.
        level_draw_power: how training draws the levels (DSM): 0 uniform (the paper), q > 0 draws level i with
            probability ∝ σ_i^(−q), favouring the small σ (``ncsn.losses.level_probabilities``). Validation
            always covers the levels evenly.
        sigma_draw: ``levels`` (the paper: σ from the list) or ``log_uniform`` (σ drawn continuously between σ_L
            and σ_1, ``ncsn.losses.dsm_loss(continuous=True)``: the network learns every σ a few-step
            sampler's grid may ask for) or ``log_normal`` (ln σ ~ N(mean, std²) = ``sigma_log_normal``, EDM's
            training distribution, clamped to [σ_L, σ_1]). Validation stays on the levels. A network with EDM's
            preconditioning (``net.precondition == "edm"``) is trained and validated with EDM's loss weight.
        sigma_log_normal: [mean, std] of ln σ for ``sigma_draw=log_normal`` (EDM's P_mean −1.2, P_std 1.2 on data in
            [−1, 1]; −1.9 = −1.2 + ln ½ on our [0, 1]).

    Besides the losses it logs what shows a collapse, without a host sync per step: ``train/grad_norm``
    (before clipping), ``train/output_ms`` and ``val/output_ms`` (mean square of σ·s: 0 for a constant zero
    output), ``val/zero_output_loss`` (the loss of a zero score on the same data and noise, D/2 for λ = σ²),
    ``val/loss_to_zero_output`` (their ratio) and ``val/collapsed`` (1 when the check fired).
    """

    loss_functions = LOSSES  # by name, for the validation pass (ncsn.app.validation)

    def __init__(
        self,
        net: nn.Module,
        sigmas: torch.Tensor,
        data_shape: list[int] | tuple[int, ...],
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        sampler: Mapping[str, Any] | None = None,
        loss: str = "dsm",
        weight_power: float = 2.0,
        val_seed: int = 0,
        nonfinite: str = "raise",
        perf: Mapping[str, Any] | PerfSettings | None = None,
        collapse_check_after: int = 100,
        level_draw_power: float = 0.0,
        sigma_draw: str = "levels",
        sigma_log_normal: Sequence[float] = (-1.9, 1.2),
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ConfigError(f"unknown loss '{loss}'; choose one of {sorted(LOSSES)}")
        if nonfinite not in ("raise", "skip"):
            raise ConfigError(f"model.nonfinite must be 'raise' or 'skip' (got '{nonfinite}')")
        if not math.isfinite(float(weight_power)):
            raise ConfigError(f"model.weight_power must be a finite number (got {weight_power})")
        check_optimizer(optimizer)
        self.net = net
        self.register_buffer("sigmas", validate_sigmas(torch.as_tensor(sigmas, dtype=torch.float32)))
        self.data_shape = tuple(int(d) for d in data_shape)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.sampler_settings = {**DEFAULT_INIT, **sampler_settings(sampler)}
        self.sampling_plan(self.sampler_settings)  # bad settings: one clear error now, not at the first sample
        self.loss_name = loss
        self.weight_power = weight_power
        self.val_seed = val_seed
        self.nonfinite = nonfinite
        self._val_sum: torch.Tensor | None = None
        self._val_count: torch.Tensor | None = None
        self._val_health: torch.Tensor | None = None
        self._val_batches: list[list[int]] | None = None  # this process's validation indices, per batch
        #: the last validation's loss per level (sigma, loss or None, count): the per-σ chart reads it
        self.val_per_level: dict | None = None
        self.collapse_check_after = int(collapse_check_after)
        #: the collapse warnings of this run so far (``metrics.json`` records them)
        self.health_warnings: list[str] = []
        self.skipped_steps = 0
        self.perf = PerfSettings.from_config(perf)
        self._perf = PerfRuntime()
        if level_draw_power != 0 and loss != "dsm":
            raise ConfigError("model.level_draw_power applies to the dsm loss only")
        if sigma_draw not in SIGMA_DRAWS:
            raise ConfigError(f"unknown model.sigma_draw '{sigma_draw}'; choose one of {', '.join(SIGMA_DRAWS)}")
        if sigma_draw != "levels" and (loss != "dsm" or level_draw_power != 0 or noise_input(net) == "level"):
            raise ConfigError(f"model.sigma_draw={sigma_draw} needs the dsm loss, uniform draws (level_draw_power 0) "
                              "and a network that is not level-indexed (ncsnv2; model=ncsn looks σ up per level)")
        self.sigma_draw = sigma_draw
        if len(sigma_log_normal) != 2 or not float(sigma_log_normal[1]) > 0:
            raise ConfigError(f"model.sigma_log_normal must be [mean, std] of ln σ, std > 0 (got {sigma_log_normal})")
        self.sigma_log_normal = (float(sigma_log_normal[0]), float(sigma_log_normal[1]))
        probs = level_probabilities(self.sigmas, level_draw_power)
        self.register_buffer("level_probs", probs if probs is not None else torch.zeros(0), persistent=False)

    # ------------------------------------------------------------------ score and loss
    @property
    def num_scales(self) -> int:
        return int(self.sigmas.shape[0])

    def score_fn(self, x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """The score s(x, σ_levels), whatever the network's parameterisation (the fast network when the
        perf settings are on for this device)."""
        fast = self._fast_forward()
        return score_function(self.net if fast is None else fast, self.sigmas)(x, levels)

    def forward(self, x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """The score (:meth:`score_fn`); with :attr:`example_input_array` the model summary counts its FLOPs."""
        return self.score_fn(x, levels)

    @property
    def example_input_array(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One input of this model's shape at the largest σ (for the model summary's FLOP count)."""
        return (torch.zeros(1, *self.data_shape, device=self.device),
                torch.zeros(1, dtype=torch.long, device=self.device))

    # ------------------------------------------------------------------ fast path (ncsn.perf)
    def perf_settings(self, device: torch.device | str | None = None) -> PerfSettings:
        """The perf settings that apply on ``device`` (default: where the module is)."""
        settings = self.perf.resolve(self.sigmas.device if device is None else device)
        if settings.compile and self.loss_name == "ssm":  # SSM needs double backward: not through compile
            settings = dataclasses.replace(settings, compile=False)
        return settings

    def _fast_forward(self, device: torch.device | str | None = None):
        device = self.sigmas.device if device is None else torch.device(device)
        return self._perf.forward_for(self.net, self.perf_settings(device), device)

    def _sync_free_checks(self) -> bool:
        return self.sigmas.is_cuda and self.perf_settings().enabled is True

    def setup(self, stage: str) -> None:
        # Prepare the network (channels_last, fp32 norms, compile) for the device the Trainer will use, before
        # the optimizer is built and a checkpoint restored. Sampling without a Trainer prepares lazily.
        if attached_trainer(self) is not None:
            self._fast_forward(self.trainer.strategy.root_device)

    def compute_loss(self, x: torch.Tensor, generator: torch.Generator | None = None) -> LossOutput:
        extra = {"level_probs": self.level_probs} if self.level_probs.numel() else {}
        if self.sigma_draw == "log_uniform":
            extra["continuous"] = True
        elif self.sigma_draw == "log_normal":
            extra["log_normal"] = self.sigma_log_normal
        return LOSSES[self.loss_name](self.score_fn, x, self.sigmas, weight_power=self.weight_power,
                                      generator=generator, **self._loss_weight(), **extra)

    def _loss_weight(self) -> dict[str, tuple[float, float]]:
        """EDM's loss weight and collapse references for a network with EDM's preconditioning (its
        ``edm_preconditioning``: ``ncsn.losses.dsm_loss(precondition=(σ_d, centre))``)."""
        preconditioning = getattr(self.net, "edm_preconditioning", None)
        if preconditioning is not None and self.loss_name == "dsm":
            return {"precondition": preconditioning}
        return {}

    @staticmethod
    def _images(batch: Any) -> torch.Tensor:
        return batch[0] if isinstance(batch, (list, tuple)) else batch

    # ------------------------------------------------------------------ training
    def _logging_step(self) -> bool:
        """Whether the loggers read this step's metrics: per-step diagnostics are only computed and logged then."""
        trainer = attached_trainer(self)
        return True if trainer is None else is_logging_step(trainer)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        x = self._images(batch)
        out = self.compute_loss(x)
        self._last_loss_output = out
        if out.output_sq_sum is not None and self._logging_step():
            self.log("train/output_ms", out.output_sq_sum / x.shape[0])
        if self.nonfinite == "raise":
            self.log("train/loss", out.loss)  # not prog_bar: Lightning would .item() it every step
            return out.loss
        if not torch.isfinite(out.loss):  # host sync only when the user asked for skipping
            self.skipped_steps += 1
            self.log("train/skipped_steps", float(self.skipped_steps))
            return None
        self.log("train/loss", out.loss)  # not prog_bar: Lightning would .item() it every step
        return out.loss

    def on_before_backward(self, loss: torch.Tensor) -> None:
        if self.nonfinite != "raise":
            return
        if self._sync_free_checks():
            # fast path: no host sync here; checked in on_before_optimizer_step, before the update is applied
            self._perf.watch.record(loss)
            self._perf_loss_output = self._last_loss_output
            return
        if not torch.isfinite(loss):
            self._raise_nonfinite(loss, self._last_loss_output)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._logging_step():
            self.log("train/grad_norm", grad_norm(self.parameters()))  # a tensor: no host sync here
        if self.nonfinite == "raise" and self._sync_free_checks():
            bad = self._perf.watch.first_bad()
            if bad is not None:
                self._raise_nonfinite(bad, self._perf_loss_output)

    def _raise_nonfinite(self, loss: torch.Tensor, out: LossOutput) -> None:
        bad = torch.nonzero(~torch.isfinite(out.level_sum)).flatten().tolist()
        where = ", ".join(f"level {i} (sigma={self.sigmas[i].item():.4g})" for i in bad) or "unknown level"
        raise NonFiniteLossError(
            f"non-finite training loss ({loss.item()}) at global step {self.global_step}, {where}; "
            "the last checkpoint is kept. Lower the learning rate or set model.nonfinite=skip"
        )

    # ------------------------------------------------------------------ checkpoints
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resume from the raw weights also when EMA is switched off for this run: the checkpoint's
        ``state_dict`` holds the EMA weights and ``current_model_state`` the raw ones (``ncsn.app.ema``); with an
        EMA callback attached, that callback restores both itself."""
        from ncsn.app.ema import weight_averaging

        if "current_model_state" not in checkpoint or attached_trainer(self) is None:
            return
        if weight_averaging(self.trainer) is not None:
            return
        checkpoint["state_dict"] = checkpoint["current_model_state"]
        if self.trainer.is_global_zero:
            log.info("EMA is off for this run: resuming from the checkpoint's raw weights (current_model_state), "
                     "not its EMA weights")

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        factory = self.optimizer_factory or functools.partial(torch.optim.Adam, lr=1e-3)
        optimizer = factory(self.parameters(), **optimizer_kwargs(factory, self.perf_settings(), self.parameters()))
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def optimizer_and_scheduler(self) -> tuple[torch.optim.Optimizer, Any]:
        """:meth:`configure_optimizers` as a pair (the scheduler None when there is none), for loops outside
        Lightning (``ncsn.diagnostics.probe_learning``, ``ncsn.tools.convert``, ``bench/``)."""
        configured = self.configure_optimizers()
        if isinstance(configured, dict):
            return configured["optimizer"], configured.get("lr_scheduler", {}).get("scheduler")
        return configured, None

    # ------------------------------------------------------------------ sampling
    def initial_samples(self, n: int, generator: torch.Generator | None = None,
                        settings: Mapping[str, Any] | None = None) -> torch.Tensor:
        """``n`` starting points for ``settings`` (default: this model's sampler), ``ncsn.samplers.initial_samples``
        on this model's data shape, σ_1 and device."""
        settings = self.sampler_settings if settings is None else settings
        return initial_samples(n, self.data_shape, self.sigmas[0], settings, generator, self.device)

    def sampling_settings(self, **overrides: Any) -> dict[str, Any]:
        """This model's sampler settings with ``overrides``. A different ``name`` switches the sampler: it starts
        from that sampler's own defaults (nothing of this model's sampler carries over but where samples start,
        ``init_low``/``init_high``), and only the overrides apply on top."""
        name = overrides.get("name")
        if name is not None and name != self.sampler_settings.get("name"):
            base = {k: self.sampler_settings[k] for k in DEFAULT_INIT if k in self.sampler_settings}
        else:
            base = dict(self.sampler_settings)
        return {**DEFAULT_INIT, **sampler_settings({**base, **overrides})}

    def snap_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """The σ the network is evaluated at for each wanted σ (``ncsn.nets.ScoreFunction.snap``): the few-step
        samplers' grids go through it, so a level-indexed network only ever sees its trained levels."""
        return score_function(self.net, self.sigmas).snap(sigma)

    def sampling_plan(self, settings: Mapping[str, Any]):
        """The sampler plan of ``settings`` on this model's σ list and network (``ncsn.samplers.build_plan``)."""
        return build_plan(self.sigmas, settings, self.snap_sigma)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        callback: Callable[[dict], None] | None = None,
        progress: bool = False,
        x_init: torch.Tensor | None = None,
        **overrides: Any,
    ) -> torch.Tensor:
        """Draw ``n`` samples (model range) with the configured sampler (any of ``ncsn.samplers.SAMPLERS``).

        ``overrides`` replace sampler settings for this call (e.g. ``name="pc"``, ``n_corrector=2``).
        """
        settings = self.sampling_settings(**overrides)
        plan = self.sampling_plan(settings)
        was_training = self.training
        self.eval()
        x = self.initial_samples(n, generator, settings) if x_init is None else x_init.to(self.device)
        kwargs = {"callback": callback, "generator": generator, "progress": progress}
        try:
            fast = self._fast_forward()
            if fast is None:
                return run_plan(plan, self.score_fn, x, self.sigmas, **kwargs)
            perf = self.perf_settings()
            return graphed_sample(
                plan, self._perf_score_fn(fast), x, self.sigmas, **kwargs,
                cuda_graphs=perf.cuda_graphs,
                cache=self._perf.graph_cache,
                cache_token=parameter_token(self) if perf.cuda_graphs else None,
            )
        finally:
            self.train(was_training)

    def _perf_score_fn(self, fast):
        """One score function per (fast forward, σ buffer), so captured CUDA graphs can be reused."""
        key = (id(fast), self.sigmas.data_ptr())
        score = self._perf.score_fns.get(key)
        if score is None:
            score = self._perf.score_fns[key] = score_function(fast, self.sigmas)
        return score
