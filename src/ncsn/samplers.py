"""Langevin samplers: plain functions over a score callable. No Lightning, no Hydra.

``score_fn(x, levels)`` takes a batch ``x`` and a LongTensor ``levels`` of shape [B] (indices into
``sigmas``, 0 = the largest σ) and returns the score ∇ₓ log p_σ(x), shaped like ``x``. Use
``ncsn.nets.score_function(net, sigmas)`` to turn a network into one.

Step-size convention (the official code's, used everywhere in this package): at level i the step is
α_i = step_lr · σ_i² / σ_L² and one Langevin step is

    x ← x + α_i · s(x, σ_i) + sqrt(2 α_i) · z,   z ~ N(0, I).

The paper's Algorithm 1 writes x ← x + (α_i/2) s + sqrt(α_i) z, so the paper's ε equals 2 · step_lr:
the paper's toy experiment (ε = 0.1) is ``step_lr=0.05`` here. For images the paper quotes ε = 2e-5
and the official code passes that same number as step_lr to the form above; our image configs follow
the official code (``step_lr=2e-5``).

The loops never synchronise with the host: step sizes are precomputed on the device, nothing calls
``.item()`` or prints per step. ``callback`` (optional) is called after every step with a dict
``{"level": i, "step": t, "sigma": σ_i (0-d tensor), "x": current sample}`` so callers can record
trajectories; ``progress=True`` shows a progress bar over levels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ncsn.errors import ConfigError

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[dict], None]


def _randn(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)


def check_sampler_settings(n_steps: int, step_lr: float) -> None:
    """Reject settings that cannot give samples (one clear line each)."""
    if int(n_steps) != n_steps or n_steps < 1:
        raise ConfigError(f"sampler.n_steps_each must be an integer >= 1 (got {n_steps})")
    if not step_lr > 0:
        raise ConfigError(f"sampler.step_lr must be > 0 (got {step_lr})")


def step_sizes(sigmas: torch.Tensor, step_lr: float) -> torch.Tensor:
    """α_i = step_lr · σ_i² / σ_L² for every level."""
    return step_lr * (sigmas / sigmas[-1]) ** 2


def _level_iter(num_levels: int, progress: bool, desc: str):
    if not progress:
        return range(num_levels)
    from tqdm.auto import tqdm

    return tqdm(range(num_levels), desc=desc, leave=False)


def langevin_step(
    score_fn: ScoreFn,
    x: torch.Tensor,
    levels: torch.Tensor,
    alpha: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One step x + α s(x) + sqrt(2α) z."""
    noise = _randn(x, generator)
    return x + alpha * score_fn(x, levels) + (2.0 * alpha).sqrt() * noise


def denoise_step(score_fn: ScoreFn, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The NCSNv2 final step x + σ_L² s(x, σ_L) (Tweedie's estimate of the clean sample)."""
    last = torch.full((x.shape[0],), sigmas.shape[0] - 1, dtype=torch.long, device=x.device)
    return x + sigmas[-1] ** 2 * score_fn(x, last)


@torch.no_grad()
def annealed_langevin(
    score_fn: ScoreFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    n_steps_each: int,
    step_lr: float,
    *,
    denoise: bool = False,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Annealed Langevin dynamics (Algorithm 1 of Song & Ermon 2019), official step convention.

    For each level i = 0 … L−1 (σ decreasing) run ``n_steps_each`` steps
    x ← x + α_i s(x, σ_i) + sqrt(2 α_i) z with α_i = step_lr σ_i²/σ_L². The paper's ε is 2·step_lr.
    With ``denoise=True`` the result gets the final step x + σ_L² s(x, σ_L) (NCSNv2).

    Args:
        score_fn: ``score_fn(x, levels)``; see the module docstring.
        x: the initial samples (e.g. uniform noise in [0, 1]); not modified in place.
        sigmas: [L] decreasing noise levels, on ``x``'s device.
        n_steps_each: T, Langevin steps per level.
        step_lr: ε of the official code.
        denoise: add the final denoising step.
        callback: called after each step with ``{"level", "step", "sigma", "x"}``.
        generator: random generator for the Langevin noise (reproducible samples).
        progress: show a progress bar over the levels.
    """
    check_sampler_settings(n_steps_each, step_lr)
    sigmas = sigmas.to(device=x.device, dtype=x.dtype)
    alphas = step_sizes(sigmas, step_lr)
    for i in _level_iter(sigmas.shape[0], progress, "annealed Langevin"):
        levels = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        for t in range(n_steps_each):
            x = langevin_step(score_fn, x, levels, alphas[i], generator)
            if callback is not None:
                callback({"level": i, "step": t, "sigma": sigmas[i], "x": x})
    if denoise:
        x = denoise_step(score_fn, x, sigmas)
    return x


@torch.no_grad()
def langevin(
    score_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    n_steps: int,
    step_lr: float,
    *,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Plain (non-annealed) Langevin dynamics with an unconditional ``score_fn(x)``:
    ``n_steps`` steps x ← x + step_lr s(x) + sqrt(2 step_lr) z."""
    check_sampler_settings(n_steps, step_lr)
    alpha = torch.tensor(step_lr, dtype=x.dtype, device=x.device)
    for t in range(n_steps):
        x = x + alpha * score_fn(x) + (2.0 * alpha).sqrt() * _randn(x, generator)
        if callback is not None:
            callback({"level": 0, "step": t, "sigma": None, "x": x})
    return x


@torch.no_grad()
def annealed_langevin_inpaint(
    score_fn: ScoreFn,
    x_known: torch.Tensor,
    mask: torch.Tensor,
    sigmas: torch.Tensor,
    n_steps_each: int,
    step_lr: float,
    *,
    x_init: torch.Tensor | None = None,
    denoise: bool = False,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Inpainting with annealed Langevin dynamics (paper Fig. 6).

    ``mask`` is 1 where pixels are known (broadcastable to ``x_known``). At each level the known pixels
    are re-noised once, x_known + σ_i z, and written into the sample before and after every step, so only
    the unknown pixels evolve. The unknown pixels start from ``x_init`` (uniform noise when omitted).
    The returned sample has the exact known pixels restored.
    """
    check_sampler_settings(n_steps_each, step_lr)
    mask = mask.to(device=x_known.device, dtype=x_known.dtype)
    sigmas = sigmas.to(device=x_known.device, dtype=x_known.dtype)
    alphas = step_sizes(sigmas, step_lr)
    if x_init is None:
        x_init = torch.rand(x_known.shape, dtype=x_known.dtype, device=x_known.device, generator=generator)
    x = x_init
    for i in _level_iter(sigmas.shape[0], progress, "inpainting"):
        levels = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        known_noisy = x_known + sigmas[i] * _randn(x_known, generator)
        x = mask * known_noisy + (1 - mask) * x
        for t in range(n_steps_each):
            x = langevin_step(score_fn, x, levels, alphas[i], generator)
            x = mask * known_noisy + (1 - mask) * x
            if callback is not None:
                callback({"level": i, "step": t, "sigma": sigmas[i], "x": x})
    if denoise:
        x = denoise_step(score_fn, x, sigmas)
    return mask * x_known + (1 - mask) * x
