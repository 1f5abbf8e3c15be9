"""Few-step samplers on a σ grid: the probability-flow ODE (``euler``, ``heun``, ``dpmpp_2m``) and its stochastic
relatives (``euler_ancestral``, ``edm``). See ``ncsn.samplers``.

Each walks a grid σ_0 > σ_1 > … > σ_{N−1} > σ_N = 0 (``sigma_grid``: EDM's ρ-spaced grid from the checkpoint's
σ_max to σ_min, or the checkpoint's own σ list) and treats the network as a denoiser, EDM's
D(x, σ) = x + σ² s(x, σ). The score callable is asked for s(x, σ) at a real σ: the second argument is a float
tensor [B] of σ values, not level indices (``ncsn.nets.score_function`` serves both); for a level-indexed network
the grid is snapped to the trained levels first (``snap``), so every step uses the σ the network really sees.

* ``euler`` — the probability-flow ODE dx/dσ = −σ s(x, σ), first order: x ← x + σ_i (σ_i − σ_{i+1}) s(x, σ_i).
  NFE = N.
* ``heun`` — EDM Algorithm 1: the Euler step, then the trapezoidal correction with the slope at σ_{i+1};
  the last step (to σ = 0) is plain Euler. NFE = 2N − 1.
* ``dpmpp_2m`` — DPM-Solver++(2M) (Lu et al. 2022; k-diffusion's ``sample_dpmpp_2m``) in t = −log σ with the
  previous step's denoised estimate; first order on the first step and on the last (to σ = 0), as in
  k-diffusion #43. NFE = N.
* ``euler_ancestral`` — k-diffusion's ancestral Euler: step down to σ_down with the ODE, add fresh noise σ_up,
  σ_down² + σ_up² = σ_{i+1}² (``s_noise`` scales it). NFE = N.
* ``edm`` — EDM Algorithm 2: raise σ_i to σ̂ = σ_i (1 + γ) by adding noise (γ = min(S_churn/N, √2 − 1) for
  S_tmin ≤ σ_i ≤ S_tmax, the noise scaled by S_noise), then a Heun step from σ̂ to σ_{i+1}. NFE = 2N − 1.

The deterministic three take ``corrector_steps`` (default 0): Langevin corrector steps at σ_min before the last
step (:class:`CorrectedLastStep`, step size from ``corrector_snr``), NFE + corrector_steps.

Each is one per-step update over a coefficient table (``SamplerPlan``), run by the shared loop
``ncsn.samplers.run_plan`` and captured by the CUDA-graph runner like the level samplers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ncsn.errors import ConfigError
from ncsn.samplers.plans import AfterStep, SamplerPlan, ScoreFn, langevin_corrector
from ncsn.sigmas import karras_grid

#: the ones whose step evaluates the network twice (Heun's correction), but the last
SECOND_ORDER = ("heun", "edm")
GRIDS = ("karras", "levels")

#: ``snap(sigma) -> sigma``: the σ a network is really evaluated at (``ncsn.nets.score_function(...).snap``)
Snap = Callable[[torch.Tensor], torch.Tensor]


def _sigma(coeffs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The step's σ (coefficient 0) as the [B] float tensor the score callable takes."""
    return coeffs[0].expand(x.shape[0])


# ---------------------------------------------------------------------------------------------- updates
def euler_step(score_fn: ScoreFn, x: torch.Tensor, levels: torch.Tensor, coeffs: torch.Tensor,
               noise: torch.Tensor, after_step: AfterStep | None = None,
               memory: torch.Tensor | None = None) -> torch.Tensor:
    """x ← x + σ (σ − σ_next) s(x, σ); ``coeffs = [σ, σ_next]``. The step to σ_next = 0 is the denoiser."""
    sigma, nxt = coeffs[0], coeffs[1]
    x = x + sigma * (sigma - nxt) * score_fn(x, _sigma(coeffs, x))
    return after_step(0, x) if after_step is not None else x


def heun_step(score_fn: ScoreFn, x: torch.Tensor, levels: torch.Tensor, coeffs: torch.Tensor,
              noise: torch.Tensor, after_step: AfterStep | None = None,
              memory: torch.Tensor | None = None) -> torch.Tensor:
    """EDM Algorithm 1's step from σ to σ_next > 0 (``coeffs = [σ, σ_next]``): with d(x, σ) = −σ s(x, σ),
    x' = x + (σ_next − σ) d(x, σ), then x ← x + (σ_next − σ) (d(x, σ) + d(x', σ_next)) / 2."""
    sigma, nxt = coeffs[0], coeffs[1]
    d = -sigma * score_fn(x, _sigma(coeffs, x))
    x_euler = x + (nxt - sigma) * d
    d_next = -nxt * score_fn(x_euler, nxt.expand(x.shape[0]))
    x = x + (nxt - sigma) * 0.5 * (d + d_next)
    return after_step(0, x) if after_step is not None else x


def dpmpp_2m_step(score_fn: ScoreFn, x: torch.Tensor, levels: torch.Tensor, coeffs: torch.Tensor,
                  noise: torch.Tensor, after_step: AfterStep | None = None,
                  memory: torch.Tensor | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) with ``coeffs = [σ, σ_next/σ, 1 − σ_next/σ, c_now, c_old]``:
    D = x + σ² s(x, σ), x ← (σ_next/σ) x + (1 − σ_next/σ) (c_now D + c_old D_prev), and D_prev ← D
    (``memory[0]``). c_now = 1 + 1/(2r), c_old = −1/(2r) with r = h_prev/h (1 and 0 on a first-order step)."""
    sigma, ratio, weight, c_now, c_old = coeffs[0], coeffs[1], coeffs[2], coeffs[3], coeffs[4]
    denoised = x + sigma * sigma * score_fn(x, _sigma(coeffs, x))
    x = ratio * x + weight * (c_now * denoised + c_old * memory[0])
    memory[0].copy_(denoised)
    return after_step(0, x) if after_step is not None else x


def euler_ancestral_step(score_fn: ScoreFn, x: torch.Tensor, levels: torch.Tensor, coeffs: torch.Tensor,
                         noise: torch.Tensor, after_step: AfterStep | None = None,
                         memory: torch.Tensor | None = None) -> torch.Tensor:
    """x ← x + σ (σ − σ_down) s(x, σ) + σ_up z; ``coeffs = [σ, σ_down, σ_up]``."""
    sigma, down, up = coeffs[0], coeffs[1], coeffs[2]
    x = x + sigma * (sigma - down) * score_fn(x, _sigma(coeffs, x)) + up * noise[0]
    return after_step(0, x) if after_step is not None else x


def edm_step(score_fn: ScoreFn, x: torch.Tensor, levels: torch.Tensor, coeffs: torch.Tensor,
             noise: torch.Tensor, after_step: AfterStep | None = None,
             memory: torch.Tensor | None = None) -> torch.Tensor:
    """EDM Algorithm 2's step, ``coeffs = [σ̂, σ_next, sqrt(σ̂² − σ²) · S_noise]``: x̂ = x + that · z, then
    :func:`heun_step` from σ̂ to σ_next (or :func:`euler_step` on the last step, ``edm_last_step``)."""
    x = x + coeffs[2] * noise[0]
    return heun_step(score_fn, x, levels, coeffs, noise, after_step, memory)


def edm_last_step(score_fn: ScoreFn, x: torch.Tensor, levels: torch.Tensor, coeffs: torch.Tensor,
                  noise: torch.Tensor, after_step: AfterStep | None = None,
                  memory: torch.Tensor | None = None) -> torch.Tensor:
    """EDM Algorithm 2's last step: the churn noise, then an Euler step to σ_next = 0."""
    x = x + coeffs[2] * noise[0]
    return euler_step(score_fn, x, levels, coeffs, noise, after_step, memory)


@dataclass(frozen=True)
class CorrectedLastStep:
    """An ODE sampler's last step (from σ_min to 0) preceded by ``steps`` Langevin corrector steps at σ_min
    (:func:`ncsn.samplers.plans.langevin_corrector`, step size from the signal-to-noise ratio in the last
    coefficient): a stochastic clean-up of the noise the deterministic path left. A value, so the CUDA-graph
    cache finds the same update again."""

    last: Callable
    steps: int

    def __call__(self, score_fn: ScoreFn, x: torch.Tensor, levels: torch.Tensor, coeffs: torch.Tensor,
                 noise: torch.Tensor, after_step: AfterStep | None = None,
                 memory: torch.Tensor | None = None) -> torch.Tensor:
        x = langevin_corrector(score_fn, x, _sigma(coeffs, x), coeffs[-1], noise[: self.steps])
        return self.last(score_fn, x, levels, coeffs, noise[self.steps :], after_step, memory)


# ---------------------------------------------------------------------------------------------- the σ grid
def sigma_grid(sigmas: torch.Tensor, settings: Mapping[str, Any], snap: Snap | None = None) -> torch.Tensor:
    """The grid σ_0 > … > σ_{N−1} > 0 = σ_N a few-step sampler walks (float64, on the CPU).

    ``grid: karras`` (default): ``num_steps`` values ρ-spaced (``rho``) from ``sigma_max`` to ``sigma_min``
    (default: the σ list's first and last), then 0. ``grid: levels``: the σ list itself, then 0
    (``num_steps`` ignored). ``snap`` maps values to the σ the network is evaluated at (nearest trained level
    for a level-indexed network); values that snap onto their predecessor are dropped, so no step is empty.
    """
    grid_name = settings.get("grid") or "karras"
    if grid_name not in GRIDS:
        raise ConfigError(f"unknown sampler.grid '{grid_name}'; choose one of {', '.join(GRIDS)}")
    top = float(settings.get("sigma_max") or sigmas[0])
    bottom = float(settings.get("sigma_min") or sigmas[-1])
    if grid_name == "levels":
        values = torch.cat([sigmas.detach().double().cpu(), torch.zeros(1, dtype=torch.float64)])
    else:
        values = karras_grid(top, bottom, settings["num_steps"], float(settings.get("rho", 7.0)))
    if snap is not None:
        positive = snap(values[:-1].to(sigmas.dtype).to(sigmas.device)).double().cpu()
        keep = torch.ones_like(positive, dtype=torch.bool)
        keep[1:] = positive[1:] < positive[:-1]
        values = torch.cat([positive[keep], values.new_zeros(1)])
    return values


# ---------------------------------------------------------------------------------------------- plans
def _check_float(settings: Mapping[str, Any], key: str, low: float = 0.0, strict: bool = False) -> float:
    value = settings[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
            value <= low if strict else value < low):
        raise ConfigError(f"sampler.{key} must be a number {'>' if strict else '>='} {low:g} (got {value})")
    return float(value)


def fewstep_plan(sigmas: torch.Tensor, settings: Mapping[str, Any], snap: Snap | None = None) -> SamplerPlan:
    """The plan of the few-step sampler ``settings['name']`` on the grid :func:`sigma_grid` gives."""
    name = settings["name"]
    grid = sigma_grid(sigmas, settings, snap)
    head, nxt = grid[:-1], grid[1:]
    n = head.shape[0]
    final_update, memory, draws = None, 0, 0
    if name == "euler":
        update, coeffs, title = euler_step, torch.stack([head, nxt], 1), "Euler (probability-flow ODE)"
    elif name == "heun":
        update, final_update, title = heun_step, euler_step, "Heun (probability-flow ODE)"
        coeffs = torch.stack([head, nxt], 1)
    elif name == "dpmpp_2m":
        update, memory, title = dpmpp_2m_step, 1, "DPM-Solver++(2M)"
        ratio = nxt / head
        c_now, c_old = torch.ones_like(head), torch.zeros_like(head)
        t = -head.log()
        for i in range(1, n - 1):  # second order except on the first step and the last (to σ = 0)
            r = (t[i] - t[i - 1]) / (-nxt[i].log() - t[i])
            c_now[i], c_old[i] = 1 + 1 / (2 * r), -1 / (2 * r)
        coeffs = torch.stack([head, ratio, 1 - ratio, c_now, c_old], 1)
    elif name == "euler_ancestral":
        s_noise = _check_float(settings, "s_noise")
        up = torch.minimum(nxt, (nxt**2 * (head**2 - nxt**2) / head**2).clamp_min(0).sqrt())
        down = (nxt**2 - up**2).clamp_min(0).sqrt()
        update, draws, title = euler_ancestral_step, 1, "Euler ancestral"
        coeffs = torch.stack([head, down, up * s_noise], 1)
    elif name == "edm":
        churn, s_noise = _check_float(settings, "s_churn"), _check_float(settings, "s_noise")
        s_tmin, s_tmax = _check_float(settings, "s_tmin"), _check_float(settings, "s_tmax")
        gamma = min(churn / n, math.sqrt(2.0) - 1.0)
        inside = (head >= s_tmin) & (head <= s_tmax)
        hat = torch.where(inside, head * (1 + gamma), head)
        if snap is not None:  # EDM's round_sigma: the raised σ is one the network knows
            hat = torch.maximum(snap(hat.to(sigmas.dtype).to(sigmas.device)).double().cpu(), head)
        update, final_update, draws, title = edm_step, edm_last_step, 1, "EDM stochastic sampler"
        coeffs = torch.stack([hat, nxt, (hat**2 - head**2).clamp_min(0).sqrt() * s_noise], 1)
    else:  # pragma: no cover - build_plan only sends the names above
        raise ConfigError(f"unknown few-step sampler '{name}'")
    evaluations = 2 * n - 1 if name in SECOND_ORDER else n
    corrector = int(settings.get("corrector_steps") or 0)
    if corrector:
        if isinstance(settings["corrector_steps"], bool) or corrector != settings["corrector_steps"] or corrector < 0:
            raise ConfigError(f"sampler.corrector_steps must be an integer >= 0 (got {settings['corrector_steps']})")
        snr = _check_float(settings, "corrector_snr", strict=True)
        coeffs = torch.cat([coeffs, torch.full_like(head[:, None], snr)], dim=1)
        final_update = CorrectedLastStep(final_update or update, corrector)
        draws, evaluations = draws + corrector, evaluations + corrector
    return SamplerPlan(name, update, coeffs.float(), draws, False, evaluations, title,
                       final_update=final_update, memory=memory, level_sigmas=grid.float())


def fewstep_nfe(settings: Mapping[str, Any], num_levels: int) -> int:
    """Network evaluations per sample of a few-step sampler on a σ-free network (a level-indexed one may need
    fewer: grid values that snap onto the same level are merged; ``plan.nfe`` is exact)."""
    steps = num_levels if (settings.get("grid") or "karras") == "levels" else int(settings["num_steps"])
    return (2 * steps - 1 if settings["name"] in SECOND_ORDER else steps) + int(settings.get("corrector_steps") or 0)

