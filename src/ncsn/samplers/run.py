"""The one loop over levels that every sampler shares (``run_plan``) and the samplers as functions. See
``ncsn.samplers``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ncsn.samplers.plans import (
    AfterStep,
    Callback,
    SamplerPlan,
    ScoreFn,
    ald_plan,
    build_plan,
    cas_plan,
    check_sampler_settings,
    denoise_step,
    fill_noise,
    level_iter,
    normal_like,
    pc_plan,
)


# ---------------------------------------------------------------------------------------------- the loop
def run_plan(
    plan: SamplerPlan,
    score_fn: ScoreFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    project: Callable[[torch.Tensor, torch.Generator | None], Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> torch.Tensor:
    """The one loop every sampler shares: for each level draw its noise, run ``plan.update`` (or
    ``plan.final_update`` at the last level), then the optional denoising step.

    ``project(σ_i, generator)`` (inpainting) returns the map applied at the start of level i (σ_i: the noise the
    sample carries there, ``plan.sigma_at``) and after each of its steps.
    """
    sigmas = sigmas.to(device=x.device, dtype=x.dtype)
    coeffs = plan.coeffs.to(device=x.device, dtype=x.dtype)
    noise = torch.empty((plan.draws, *x.shape), dtype=x.dtype, device=x.device)
    memory = torch.zeros((plan.memory, *x.shape), dtype=x.dtype, device=x.device) if plan.memory else None
    for i in level_iter(plan.num_levels, progress, plan.title):
        levels = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        sigma = plan.sigma_at(i, sigmas)
        fix = project(sigma, generator) if project is not None else None
        if fix is not None:
            x = fix(x)
        for t in range(plan.draws):
            fill_noise(noise[t], generator)
        after_step = _after_step(i, sigma, callback, fix)
        x = plan.update_at(i)(score_fn, x, levels, coeffs[i], noise, after_step, memory)
    if plan.denoise:
        x = denoise_step(score_fn, x, sigmas)
    return x


def _after_step(level: int, sigma: torch.Tensor, callback: Callback | None,
                fix: Callable[[torch.Tensor], torch.Tensor] | None) -> AfterStep | None:
    if callback is None and fix is None:
        return None

    def after(t: int, x: torch.Tensor) -> torch.Tensor:
        if fix is not None:
            x = fix(x)
        if callback is not None:
            callback({"level": level, "step": t, "sigma": sigma, "x": x})
        return x

    return after


@torch.no_grad()
def sample(
    score_fn: ScoreFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    settings: Mapping[str, Any] | None = None,
    *,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    snap: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run the sampler named in ``settings`` (any of ``SAMPLERS``; see :func:`sampler_settings`). The few-step
    samplers ask ``score_fn`` for s(x, σ) at real σ (a float tensor [B]); a level-indexed network's
    adapter (``ncsn.nets.score_function``) should then be passed as ``snap`` too."""
    sigmas = sigmas.to(device=x.device, dtype=x.dtype)
    return run_plan(build_plan(sigmas, settings, snap), score_fn, x, sigmas, callback=callback, generator=generator,
                    progress=progress)


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
    With ``denoise=True`` the result gets the final step x + σ_L² s(x, σ_L) (NCSNv2). NFE: L·T (+1).

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
    sigmas = sigmas.to(device=x.device, dtype=x.dtype)
    return run_plan(ald_plan(sigmas, n_steps_each, step_lr, denoise), score_fn, x, sigmas, callback=callback,
                    generator=generator, progress=progress)


@torch.no_grad()
def predictor_corrector(
    score_fn: ScoreFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    n_corrector: int = 1,
    snr: float = 0.16,
    *,
    denoise: bool = True,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Predictor–corrector sampling (Song et al. 2021, score_sde's ``pc_sampler`` for the VE SDE on the
    discrete σ list; :func:`pc_level`): at each level ``n_corrector`` Langevin corrector steps with
    signal-to-noise ratio ``snr``, then the reverse-diffusion predictor step to the next level. With
    ``denoise`` the last predictor step adds no noise (score_sde's ``noise_removal``). NFE: L·(1 + n_corrector).
    ``x`` should carry noise of the first level (e.g. uniform noise + σ_1 z)."""
    sigmas = sigmas.to(device=x.device, dtype=x.dtype)
    return run_plan(pc_plan(sigmas, n_corrector, snr, denoise), score_fn, x, sigmas, callback=callback,
                    generator=generator, progress=progress)


@torch.no_grad()
def consistent_annealed(
    score_fn: ScoreFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    n_steps_each: int = 1,
    step_lr: float = 2e-5,
    *,
    denoise: bool = True,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Consistent annealed sampling (Jolicoeur-Martineau et al. 2021, Algorithm 2; :func:`cas_level`), with
    α_i = η σ_i², η = step_lr / σ_L² (ALD's step convention). With ``denoise`` (the default) levels 1 … L−1 and
    then the denoising step at σ_L, NFE (L−1)·T + 1; without it the paper's last level σ_L too, whose step
    moves the noise to σ_{L+1} = 0 with no fresh noise, NFE L·T. ``n_steps_each`` > 1 adds steps that keep the
    level (the paper's algorithm is 1: a choice of ours). Needs 1 − σ_{i+1}/σ_i ≤ η ≤ 1 + σ_{i+1}/σ_i at every
    level (the official code's range: a step may overshoot the noise by the next level's; one clear error
    otherwise)."""
    sigmas = sigmas.to(device=x.device, dtype=x.dtype)
    return run_plan(cas_plan(sigmas, n_steps_each, step_lr, denoise), score_fn, x, sigmas, callback=callback,
                    generator=generator, progress=progress)


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
        x = x + alpha * score_fn(x) + (2.0 * alpha).sqrt() * normal_like(x, generator)
        if callback is not None:
            callback({"level": 0, "step": t, "sigma": None, "x": x})
    return x


@torch.no_grad()
def inpaint(
    score_fn: ScoreFn,
    x_known: torch.Tensor,
    mask: torch.Tensor,
    sigmas: torch.Tensor,
    settings: Mapping[str, Any] | None = None,
    *,
    x_init: torch.Tensor | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    snap: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Inpainting with any sampler (paper Fig. 6 with ``ald``).

    ``mask`` is 1 where pixels are known (broadcastable to ``x_known``). At each level the known pixels are
    re-noised once, x_known + σ_i z, and written into the sample at the level's start and after every step,
    so only the unknown pixels evolve (for a few-step sampler σ_i is the grid's σ at the step's start, so
    before each step the known pixels carry the noise of the σ the step starts from). The unknown pixels start
    from ``x_init`` (uniform noise when omitted; add σ_1 z for a sampler that starts from the prior).
    The returned sample has the exact known pixels restored.
    """
    mask = mask.to(device=x_known.device, dtype=x_known.dtype)
    sigmas = sigmas.to(device=x_known.device, dtype=x_known.dtype)
    plan = build_plan(sigmas, settings, snap)
    if x_init is None:
        x_init = torch.rand(x_known.shape, dtype=x_known.dtype, device=x_known.device, generator=generator)

    def project(sigma: torch.Tensor, gen: torch.Generator | None) -> Callable[[torch.Tensor], torch.Tensor]:
        known_noisy = x_known + sigma * normal_like(x_known, gen)
        return lambda x: mask * known_noisy + (1 - mask) * x

    x = run_plan(plan, score_fn, x_init, sigmas, callback=callback, generator=generator, progress=progress,
                 project=project)
    return mask * x_known + (1 - mask) * x


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
    """:func:`inpaint` with annealed Langevin dynamics (paper Fig. 6)."""
    settings = {"name": "ald", "n_steps_each": n_steps_each, "step_lr": step_lr, "denoise": denoise}
    return inpaint(score_fn, x_known, mask, sigmas, settings, x_init=x_init, callback=callback,
                   generator=generator, progress=progress)
