"""What each sampler does at one level (``ald_level``, ``pc_level``, ``cas_level``), its coefficients and NFE
(``SamplerPlan``, ``build_plan``), and the settings every sampler shares. See ``ncsn.samplers``."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ncsn.errors import ConfigError
from ncsn.sigmas import geometric_sigmas

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[dict], None]
#: ``after_step(t, x) -> x``: called after step t of a level (trajectories, inpainting); None in graphs
AfterStep = Callable[[int, torch.Tensor], torch.Tensor]
#: ``update(score_fn, x, levels, coeffs, noise, after_step, memory) -> x``: the steps of one level; ``memory``
#: ([plan.memory, *x.shape], or None) holds what a multistep sampler carries from one level to the next
LevelUpdate = Callable[..., torch.Tensor]


#: each sampler's settings and their defaults (``conf/sampler/NAME.yaml`` holds the same)
SAMPLER_DEFAULTS: dict[str, dict[str, Any]] = {
    # num_levels: null walks the trained σ list; N walks N levels spaced geometrically from σ_1 to σ_L (a network
    # that takes any σ only: NCSNv2, with or without its σ embedding)
    "ald": {"n_steps_each": 100, "step_lr": 2e-5, "denoise": False, "num_levels": None},
    "pc": {"n_corrector": 1, "snr": 0.16, "denoise": True, "num_levels": None},
    "cas": {"n_steps_each": 1, "step_lr": 2e-5, "denoise": True, "num_levels": None},
    # the few-step samplers (ncsn.samplers.fewstep): a ρ-spaced σ grid (or the trained levels), then σ = 0;
    # sigma_max / sigma_min null = the checkpoint's σ_1 / σ_L
    "euler": {"num_steps": 35, "rho": 7.0, "grid": "karras", "sigma_max": None, "sigma_min": None,
              "corrector_steps": 0, "corrector_snr": 0.16},
    "heun": {"num_steps": 18, "rho": 7.0, "grid": "karras", "sigma_max": None, "sigma_min": None,
             "corrector_steps": 0, "corrector_snr": 0.16},
    "dpmpp_2m": {"num_steps": 20, "rho": 7.0, "grid": "karras", "sigma_max": None, "sigma_min": None,
                 "corrector_steps": 0, "corrector_snr": 0.16},
    "euler_ancestral": {"num_steps": 50, "rho": 7.0, "grid": "karras", "sigma_max": None, "sigma_min": None,
                        "s_noise": 1.0},
    "edm": {"num_steps": 18, "rho": 7.0, "grid": "karras", "sigma_max": None, "sigma_min": None,
            "s_churn": 40.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003},
}
SAMPLERS = tuple(SAMPLER_DEFAULTS)
#: the samplers that walk their own σ grid down to σ = 0 (``ncsn.samplers.fewstep``)
FEWSTEP_SAMPLERS = ("euler", "heun", "dpmpp_2m", "euler_ancestral", "edm")


def normal_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)


def fill_noise(buffer: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Draw standard normal noise into ``buffer`` (contiguous) in place: the same numbers
    ``torch.randn(buffer.shape, generator=generator)`` (or ``randn_like``) would give."""
    return buffer.normal_(generator=generator)


def check_sampler_settings(n_steps: int, step_lr: float) -> None:
    """Reject settings that cannot give samples (one clear line each)."""
    if int(n_steps) != n_steps or n_steps < 1:
        raise ConfigError(f"sampler.n_steps_each must be an integer >= 1 (got {n_steps})")
    if not step_lr > 0:
        raise ConfigError(f"sampler.step_lr must be > 0 (got {step_lr})")


def step_sizes(sigmas: torch.Tensor, step_lr: float) -> torch.Tensor:
    """α_i = step_lr · σ_i² / σ_L² for every level."""
    return step_lr * (sigmas / sigmas[-1]) ** 2


def level_iter(num_levels: int, progress: bool, desc: str):
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
    noise = normal_like(x, generator)
    return x + alpha * score_fn(x, levels) + (2.0 * alpha).sqrt() * noise


def denoise_step(score_fn: ScoreFn, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The NCSNv2 final step x + σ_L² s(x, σ_L) (Tweedie's estimate of the clean sample)."""
    last = torch.full((x.shape[0],), sigmas.shape[0] - 1, dtype=torch.long, device=x.device)
    return x + sigmas[-1] ** 2 * score_fn(x, last)


# ---------------------------------------------------------------------------------------------- level updates
def ald_level(score_fn: ScoreFn, x: torch.Tensor, levels: torch.Tensor, coeffs: torch.Tensor,
              noise: torch.Tensor, after_step: AfterStep | None = None,
              memory: torch.Tensor | None = None) -> torch.Tensor:
    """``noise.shape[0]`` Langevin steps x ← x + α s(x, σ) + sqrt(2α) z_t; ``coeffs = [α]``."""
    alpha = coeffs[0]
    sqrt_2alpha = (2.0 * alpha).sqrt()
    for t in range(noise.shape[0]):
        x = x + alpha * score_fn(x, levels) + sqrt_2alpha * noise[t]
        if after_step is not None:
            x = after_step(t, x)
    return x


def langevin_corrector(score_fn: ScoreFn, x: torch.Tensor, noise_level: torch.Tensor, snr: torch.Tensor,
                       noise: torch.Tensor, after_step: AfterStep | None = None) -> torch.Tensor:
    """``noise.shape[0]`` Langevin corrector steps at one noise level (score_sde's ``LangevinCorrector``): with the
    batch-mean norms of the score g and of the noise z, ε = 2 (snr ‖z‖ / ‖g‖)² and x ← x + ε g + sqrt(2ε) z.
    ``noise_level``: what ``score_fn`` takes (level indices or σ values)."""
    for t in range(noise.shape[0]):
        grad = score_fn(x, noise_level)
        grad_norm = grad.flatten(1).norm(dim=1).mean()
        noise_norm = noise[t].flatten(1).norm(dim=1).mean()
        eps = 2.0 * (snr * noise_norm / grad_norm.clamp_min(1e-12)) ** 2
        x = x + eps * grad + (2.0 * eps).sqrt() * noise[t]
        if after_step is not None:
            x = after_step(t, x)
    return x


def pc_level(score_fn: ScoreFn, x: torch.Tensor, levels: torch.Tensor, coeffs: torch.Tensor,
             noise: torch.Tensor, after_step: AfterStep | None = None,
             memory: torch.Tensor | None = None) -> torch.Tensor:
    """score_sde's predictor–corrector at one level; ``coeffs = [σ_i² − σ_{i+1}², predictor noise, snr]``.

    Corrector (``noise.shape[0] − 1`` steps of :func:`langevin_corrector`, score_sde's ``LangevinCorrector`` for
    the VE SDE).
    Predictor (score_sde's ``ReverseDiffusionPredictor``, VE): x ← x + (σ_i² − σ_{i+1}²) s(x, σ_i)
    + sqrt(σ_i² − σ_{i+1}²) z, taking the noise level from σ_i to σ_{i+1} (0 after the last level, where the
    noise is dropped when denoising, which makes the last predictor step the denoising step itself).
    """
    g2, g, snr = coeffs[0], coeffs[1], coeffs[2]
    n_corrector = noise.shape[0] - 1
    x = langevin_corrector(score_fn, x, levels, snr, noise[:n_corrector], after_step)
    x = x + g2 * score_fn(x, levels) + g * noise[n_corrector]
    if after_step is not None:
        x = after_step(n_corrector, x)
    return x


def cas_level(score_fn: ScoreFn, x: torch.Tensor, levels: torch.Tensor, coeffs: torch.Tensor,
              noise: torch.Tensor, after_step: AfterStep | None = None,
              memory: torch.Tensor | None = None) -> torch.Tensor:
    """Consistent annealed sampling at one level; ``coeffs = [α_i, b_keep, b_move]``.

    Each step x ← x + α_i s(x, σ_i) + b z with α_i = η σ_i²: if x carries noise of std σ_i, the score step
    leaves (1 − η) σ_i of it, and b tops it up to the target level: b_keep = σ_i sqrt(1 − (1 − η)²) for the
    first T − 1 steps (the level stays at σ_i), b_move = σ_{i+1} sqrt(1 − (1 − η)² γ_i²), γ_i = σ_i/σ_{i+1},
    for the last (the level becomes σ_{i+1}).
    """
    alpha, keep, move = coeffs[0], coeffs[1], coeffs[2]
    last = noise.shape[0] - 1
    for t in range(noise.shape[0]):
        x = x + alpha * score_fn(x, levels) + (move if t == last else keep) * noise[t]
        if after_step is not None:
            x = after_step(t, x)
    return x


# ---------------------------------------------------------------------------------------------- plans
@dataclass(frozen=True)
class SamplerPlan:
    """How one sampler walks the σ list: ``update`` runs the ``draws`` steps of level i with coefficients
    ``coeffs[i]`` over ``draws`` pre-drawn noise tensors, for the first ``coeffs.shape[0]`` levels; then the
    optional denoising step at σ_L. ``nfe``: network evaluations per sample.

    The few-step samplers (``ncsn.samplers.fewstep``) walk their own σ grid instead: level i is the step from
    ``level_sigmas[i]`` to ``level_sigmas[i + 1]`` (the σ the sample carries at the level's start, for
    callbacks and inpainting; None means the σ list itself), ``final_update`` (when set) replaces ``update``
    at the last level (Heun's last step to σ = 0 is an Euler step), and ``memory`` tensors shaped like x
    carry state from one level to the next (DPM-Solver++ 2M's previous denoised estimate)."""

    name: str
    update: LevelUpdate
    coeffs: torch.Tensor
    draws: int
    denoise: bool
    nfe: int
    title: str
    final_update: LevelUpdate | None = None
    memory: int = 0
    level_sigmas: torch.Tensor | None = None

    @property
    def num_levels(self) -> int:
        return int(self.coeffs.shape[0])

    def update_at(self, level: int) -> LevelUpdate:
        """The update that runs level ``level``."""
        if self.final_update is not None and level == self.num_levels - 1:
            return self.final_update
        return self.update

    def sigma_at(self, level: int, sigmas: torch.Tensor) -> torch.Tensor:
        """The noise level the sample carries at the start of ``level`` (0-d, on ``sigmas``' device)."""
        if self.level_sigmas is None:
            return sigmas[level]
        return self.level_sigmas[level].to(device=sigmas.device, dtype=sigmas.dtype)


def _int_setting(settings: Mapping[str, Any], key: str, minimum: int) -> int:
    value = settings[key]
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise ConfigError(f"sampler.{key} must be an integer >= {minimum} (got {value})")
    return int(value)


def sampler_settings(settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """``settings`` completed with its sampler's defaults (``name`` defaults to ``ald``), keeping only the keys
    that sampler reads (and ``init_low``/``init_high``); unknown names are one clear error."""
    settings = dict(settings or {})
    name = settings.get("name") or "ald"
    if name not in SAMPLER_DEFAULTS:
        raise ConfigError(f"unknown sampler '{name}'; choose one of {', '.join(SAMPLERS)} (sampler=NAME)")
    defaults = SAMPLER_DEFAULTS[name]
    # only the settings this sampler reads (and where samples start): another sampler's keys do not ride along
    merged = {**defaults, **{k: v for k, v in settings.items()
                             if v is not None and (k in defaults or k in DEFAULT_INIT)}}
    merged["name"] = name
    return merged


#: where samples start: uniform on [init_low, init_high] (pc and cas add σ_1 z to it)
DEFAULT_INIT = {"init_low": 0.0, "init_high": 1.0}
#: samplers that start from the first level's noisy data rather than from plain uniform noise
STARTS_FROM_PRIOR = ("pc", "cas", *FEWSTEP_SAMPLERS)


def initial_samples(n: int, shape: tuple[int, ...], sigma_max: torch.Tensor | float, settings: Mapping[str, Any],
                    generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """``n`` starting points of shape ``shape`` for ``settings``: uniform on [init_low, init_high] (default
    [0, 1]), plus σ_1 z (``sigma_max``) for the samplers that start from the first level's noisy data."""
    settings = {**DEFAULT_INIT, **settings}
    low, high = settings["init_low"], settings["init_high"]
    x = low + (high - low) * torch.rand((n, *shape), device=device, generator=generator)
    if settings.get("name") in STARTS_FROM_PRIOR:
        sigma_max = settings.get("sigma_max") or sigma_max  # a few-step grid may start elsewhere
        x = x + sigma_max * torch.randn(x.shape, device=device, generator=generator)
    return x


def describe_sampler(settings: Mapping[str, Any]) -> str:
    """``pc (n_corrector=1, snr=0.16, denoise=True)``: the sampler's name and the settings it reads."""
    s = sampler_settings(settings)
    return f"{s['name']} (" + ", ".join(f"{k}={s[k]}" for k in SAMPLER_DEFAULTS[s["name"]]) + ")"


def ald_plan(sigmas: torch.Tensor, n_steps_each: int, step_lr: float, denoise: bool = False) -> SamplerPlan:
    check_sampler_settings(n_steps_each, step_lr)
    coeffs = step_sizes(sigmas, step_lr)[:, None]
    n = int(n_steps_each)
    settings = {"name": "ald", "n_steps_each": n, "step_lr": step_lr, "denoise": denoise}
    return SamplerPlan("ald", ald_level, coeffs, n, bool(denoise), nfe(settings, sigmas.shape[0]),
                       "annealed Langevin")


def pc_plan(sigmas: torch.Tensor, n_corrector: int = 1, snr: float = 0.16, denoise: bool = True) -> SamplerPlan:
    n_corrector = _int_setting({"n_corrector": n_corrector}, "n_corrector", 0)
    if not snr > 0:
        raise ConfigError(f"sampler.snr must be > 0 (got {snr})")
    nxt = torch.cat([sigmas[1:], sigmas.new_zeros(1)])
    g2 = sigmas**2 - nxt**2
    g = g2.sqrt()
    if denoise:
        g[-1] = 0.0  # the last predictor step is x + σ_L² s(x, σ_L): the denoising step, without noise
    coeffs = torch.stack([g2, g, torch.full_like(g2, float(snr))], dim=1)
    settings = {"name": "pc", "n_corrector": n_corrector, "snr": snr, "denoise": denoise}
    return SamplerPlan("pc", pc_level, coeffs, n_corrector + 1, False, nfe(settings, sigmas.shape[0]),
                       "predictor-corrector")


def cas_plan(sigmas: torch.Tensor, n_steps_each: int = 1, step_lr: float = 2e-5,
             denoise: bool = True) -> SamplerPlan:
    check_sampler_settings(n_steps_each, step_lr)
    if sigmas.shape[0] < 2:
        raise ConfigError("consistent annealed sampling (sampler=cas) needs at least 2 noise levels")
    eta = float(step_lr) / float(sigmas[-1]) ** 2
    ratios = sigmas[:-1] / sigmas[1:]
    gamma_max = float(ratios.max())
    least = float(sigmas[-1]) ** 2 * (1.0 - 1.0 / gamma_max)
    most = 1.0 + 1.0 / gamma_max  # (η − 1) γ ≤ 1: the noise may overshoot by at most the next level's
    if eta > most + 1e-6:
        raise ConfigError(f"sampler.step_lr={step_lr:g} overshoots the noise of a level with sampler=cas "
                          f"(step_lr / sigma_L^2 = {eta:.3g} > 1 + sigma_(i+1)/sigma_i = {most:.3g}): use "
                          f"step_lr <= {most * float(sigmas[-1]) ** 2:.3g}")
    if (1.0 - eta) * gamma_max > 1.0 + 1e-9:
        raise ConfigError(f"sampler.step_lr={step_lr:g} is too small for sampler=cas on this sigma list: each "
                          f"step must remove at least the noise between two levels; use step_lr >= {least:.3g}")
    n = int(n_steps_each)
    # levels 1 … L−1 move the noise to the next level; without the denoising step the paper's last step runs at
    # σ_L too, moving to σ_{L+1} = 0 (no fresh noise)
    head = sigmas if not denoise else sigmas[:-1]
    nxt = torch.cat([sigmas[1:], sigmas.new_zeros(1)])[: head.shape[0]]
    alpha = eta * head**2
    keep = head * math.sqrt(max(0.0, 1.0 - (1.0 - eta) ** 2))
    move = (nxt**2 - ((1.0 - eta) * head) ** 2).clamp_min(0.0).sqrt()
    coeffs = torch.stack([alpha, keep, move], dim=1)
    settings = {"name": "cas", "n_steps_each": n, "step_lr": step_lr, "denoise": denoise}
    return SamplerPlan("cas", cas_level, coeffs, n, bool(denoise), nfe(settings, sigmas.shape[0]),
                       "consistent annealed sampling")


class AtSigmas:
    """A level update that asks the score at the σ of its own level list (``sampler.num_levels``) rather than at
    an index into the trained list: level i of the plan is evaluated at exactly ``sigmas[i]``."""

    def __init__(self, update: LevelUpdate, sigmas: torch.Tensor) -> None:
        self.update, self.sigmas = update, sigmas.detach().cpu()
        self._key = (update, tuple(self.sigmas.tolist()))
        self._on: dict[tuple, torch.Tensor] = {}  # per device and dtype: no host copy inside a CUDA-graph capture

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AtSigmas) and self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __call__(self, score_fn: ScoreFn, x: torch.Tensor, levels: torch.Tensor, *args: Any) -> torch.Tensor:
        key = (str(x.device), x.dtype)
        if key not in self._on:
            self._on[key] = self.sigmas.to(device=x.device, dtype=x.dtype)
        return self.update(score_fn, x, self._on[key][levels], *args)


def sampling_levels(sigmas: torch.Tensor, settings: Mapping[str, Any],
                    snap: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor | None:
    """The σ list a level sampler walks when ``sampler.num_levels`` is set: N levels spaced geometrically from the
    trained σ_1 to σ_L (None when unset: the trained list). Needs a network evaluated at any σ (``snap`` says)."""
    if settings.get("num_levels") is None:
        return None
    n = _int_setting(settings, "num_levels", 2)
    sub = geometric_sigmas(float(sigmas[0]), float(sigmas[-1]), n).to(sigmas.dtype)
    if snap is not None and not torch.allclose(snap(sub.to(sigmas.device)).cpu(), sub):
        raise ConfigError("sampler.num_levels needs a network that takes any σ (model=ncsnv2); this one knows only "
                          "its trained levels: leave sampler.num_levels=null")
    return sub.to(sigmas.device)


def build_plan(sigmas: torch.Tensor, settings: Mapping[str, Any] | None,
               snap: Callable[[torch.Tensor], torch.Tensor] | None = None) -> SamplerPlan:
    """The plan of the sampler named in ``settings['name']`` (default ``ald``) on ``sigmas``. ``snap``: the σ the
    network is really evaluated at for a wanted σ (``score_function(...).snap``): the few-step samplers' grids and
    ``num_levels`` go through it."""
    s = sampler_settings(settings)
    if s["name"] in FEWSTEP_SAMPLERS:
        from ncsn.samplers.fewstep import fewstep_plan  # fewstep builds on this module's SamplerPlan

        return fewstep_plan(sigmas, s, snap)
    sub = sampling_levels(sigmas, s, snap)
    if sub is None:
        return _level_plan(sigmas, s)
    plan = _level_plan(sub, s)
    return dataclasses.replace(plan, update=AtSigmas(plan.update, sub), level_sigmas=sub)


def _level_plan(sigmas: torch.Tensor, s: Mapping[str, Any]) -> SamplerPlan:
    if s["name"] == "pc":
        return pc_plan(sigmas, s["n_corrector"], float(s["snr"]), bool(s["denoise"]))
    if s["name"] == "cas":
        return cas_plan(sigmas, s["n_steps_each"], float(s["step_lr"]), bool(s["denoise"]))
    return ald_plan(sigmas, s["n_steps_each"], float(s["step_lr"]), bool(s["denoise"]))


def nfe(settings: Mapping[str, Any] | None, num_levels: int) -> int:
    """Network evaluations per sample of a sampler's settings on ``num_levels`` levels (what ``plan.nfe`` is)."""
    s = sampler_settings(settings)
    if s["name"] in FEWSTEP_SAMPLERS:
        from ncsn.samplers.fewstep import fewstep_nfe

        return fewstep_nfe(s, num_levels)
    denoise = int(bool(s["denoise"]))
    num_levels = _int_setting(s, "num_levels", 2) if s.get("num_levels") is not None else num_levels
    if s["name"] == "pc":
        return num_levels * (1 + _int_setting(s, "n_corrector", 0))
    if s["name"] == "cas":
        steps = _int_setting(s, "n_steps_each", 1)
        return (num_levels - 1) * steps + (1 if denoise else steps)
    return num_levels * _int_setting(s, "n_steps_each", 1) + denoise


