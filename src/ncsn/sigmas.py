"""Noise schedules σ_1 > σ_2 > … > σ_L and the NCSNv2 rules that pick them from data.

Plain functions over tensors: no Lightning, no Hydra.

* ``geometric_sigmas`` / ``linear_sigmas`` build a validated, strictly decreasing float32 list.
* The NCSNv2 techniques (Song & Ermon 2020, "Improved Techniques for Training Score-Based Generative
  Models"):

  - technique 1: σ_1 = the largest pairwise Euclidean distance between training points
    (``largest_pairwise_distance``, computed in chunks so memory stays bounded);
  - technique 2: the geometric ratio γ such that
    Φ(√(2D)(γ−1) + 3γ) − Φ(√(2D)(γ−1) − 3γ) ≈ 0.5 (``technique2_ratio``, ``technique2_value``),
    and from it the number of levels L (``num_scales_for_ratio``);
  - technique 4: the step size ε for T Langevin steps per level that brings
    (1 − ε/σ_L²)^{2T} (γ² − 2ε/(σ_L² − σ_L²(1 − ε/σ_L²)²)) + 2ε/(σ_L² − σ_L²(1 − ε/σ_L²)²)
    closest to 1 (``technique4_step_lr``). ε here is our ``step_lr`` (α_i = ε σ_i²/σ_L²).

``suggest_schedule`` combines the three and is what ``python -m ncsn.sigmas suggest`` prints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ncsn.errors import ConfigError


def validate_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """Check that ``sigmas`` is a 1-D, finite, positive, strictly decreasing list of at least 2 levels."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ConfigError(
            f"need at least 2 noise levels (got {sigmas.numel()}); set sigmas.num_scales >= 2"
        )
    if not torch.isfinite(sigmas).all() or (sigmas <= 0).any():
        raise ConfigError(f"every sigma must be finite and > 0 (got min {sigmas.min().item():g}); fix sigmas")
    if not (sigmas[:-1] > sigmas[1:]).all():
        raise ConfigError(
            "sigmas must be strictly decreasing (sigma_max > ... > sigma_min); "
            f"got first {sigmas[0].item():g}, last {sigmas[-1].item():g}"
        )
    return sigmas


def _check_range(sigma_max: float, sigma_min: float, num_scales: int) -> None:
    if int(num_scales) != num_scales or num_scales < 2:
        raise ConfigError(f"sigmas.num_scales must be an integer >= 2 (got {num_scales})")
    if not (sigma_min > 0) or not math.isfinite(sigma_min):
        raise ConfigError(f"sigmas.sigma_min must be > 0 and finite (got {sigma_min})")
    if not math.isfinite(sigma_max):
        raise ConfigError(f"sigmas.sigma_max must be a finite number (got {sigma_max})")
    if not (sigma_max > sigma_min):
        raise ConfigError(
            f"sigmas.sigma_max ({sigma_max}) must be larger than sigmas.sigma_min ({sigma_min})"
        )


def geometric_sigmas(sigma_max: float = 1.0, sigma_min: float = 0.01, num_scales: int = 10) -> torch.Tensor:
    """The paper's schedule: ``num_scales`` levels spaced evenly in log σ from ``sigma_max`` to ``sigma_min``."""
    _check_range(sigma_max, sigma_min, num_scales)
    log_sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), int(num_scales), dtype=torch.float64)
    return validate_sigmas(log_sigmas.exp().float())


def linear_sigmas(sigma_max: float = 1.0, sigma_min: float = 0.01, num_scales: int = 10) -> torch.Tensor:
    """``num_scales`` levels spaced evenly in σ from ``sigma_max`` down to ``sigma_min``."""
    _check_range(sigma_max, sigma_min, num_scales)
    return validate_sigmas(torch.linspace(sigma_max, sigma_min, int(num_scales), dtype=torch.float64).float())


def karras_grid(sigma_max: float, sigma_min: float, num_steps: int, rho: float = 7.0) -> torch.Tensor:
    """The few-step samplers' σ grid (Karras et al. 2022, EDM eq. 5): ``num_steps`` values from ``sigma_max``
    to ``sigma_min`` spaced evenly in σ^(1/ρ) (ρ = 7 puts most steps at small σ; ρ → ∞ is geometric), then 0.
    Returns float64 [num_steps + 1]; ``num_steps = 1`` is [σ_max, 0]."""
    if isinstance(num_steps, bool) or int(num_steps) != num_steps or num_steps < 1:
        raise ConfigError(f"sampler.num_steps must be an integer >= 1 (got {num_steps})")
    if not 0 < sigma_min < sigma_max:
        raise ConfigError("the sampler's sigma grid needs 0 < sigma_min < sigma_max "
                          f"(got {sigma_min:g}, {sigma_max:g})")
    if not rho > 0:
        raise ConfigError(f"sampler.rho must be > 0 (got {rho})")
    n = int(num_steps)
    if n == 1:
        return torch.tensor([float(sigma_max), 0.0], dtype=torch.float64)
    ramp = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    hi, lo = float(sigma_max) ** (1.0 / rho), float(sigma_min) ** (1.0 / rho)
    grid = (hi + ramp * (lo - hi)) ** rho
    grid[0], grid[-1] = float(sigma_max), float(sigma_min)  # exact ends (no round-off from the power)
    return torch.cat([grid, grid.new_zeros(1)])


def explicit_sigmas(values: list[float]) -> torch.Tensor:
    """A user-given list of levels, validated."""
    return validate_sigmas(torch.tensor(list(values), dtype=torch.float32))


# --------------------------------------------------------------------------------------------------
# NCSNv2 technique 1: σ_1 from the data
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def largest_pairwise_distance(x: torch.Tensor, chunk_size: int = 1024) -> float:
    """Largest Euclidean distance between any two rows of ``x`` (flattened per sample).

    Works on ``chunk_size`` × N blocks so memory stays O(chunk_size · N) instead of O(N²).
    Distances are computed in float64 as ‖a‖² + ‖b‖² − 2a·b, which is exact enough for image data.
    """
    flat = x.reshape(x.shape[0], -1).to(torch.float64)
    if flat.shape[0] < 2:
        raise ConfigError("need at least 2 data points to measure the largest pairwise distance")
    sq_norms = (flat * flat).sum(dim=1)
    best = 0.0
    for start in range(0, flat.shape[0], chunk_size):
        block = flat[start : start + chunk_size]
        d2 = sq_norms[start : start + chunk_size, None] + sq_norms[None, :] - 2.0 * block @ flat.T
        best = max(best, d2.clamp_min(0).max().item())
    return math.sqrt(best)


# --------------------------------------------------------------------------------------------------
# NCSNv2 technique 2: the ratio γ and the number of levels
# --------------------------------------------------------------------------------------------------


def _normal_cdf(t: float) -> float:
    return 0.5 * (1.0 + math.erf(t / math.sqrt(2.0)))


def technique2_value(ratio: float, dim: int) -> float:
    """Φ(√(2D)(γ−1) + 3γ) − Φ(√(2D)(γ−1) − 3γ) for the ratio γ = σ_{i−1}/σ_i in D dimensions.

    NCSNv2 asks for a γ that makes this ≈ 0.5. At the official CIFAR-10 schedule (σ 50 → 0.01,
    L = 232, D = 3072) it evaluates to ≈ 0.567: the official configs sit a bit above 0.5.
    """
    root = math.sqrt(2.0 * dim) * (ratio - 1.0)
    return _normal_cdf(root + 3.0 * ratio) - _normal_cdf(root - 3.0 * ratio)


def technique2_ratio(dim: int, target: float = 0.5) -> float:
    """The ratio γ > 1 at which ``technique2_value`` equals ``target`` (bisection; the value falls with γ)."""
    if not 0.0 < target < 1.0:
        raise ConfigError(f"technique-2 target must lie in (0, 1) (got {target})")
    lo, hi = 1.0, 2.0
    while technique2_value(hi, dim) > target:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if technique2_value(mid, dim) > target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def num_scales_for_ratio(sigma_max: float, sigma_min: float, ratio: float) -> int:
    """Smallest L whose geometric schedule from ``sigma_max`` to ``sigma_min`` has ratio ≤ ``ratio``."""
    _check_range(sigma_max, sigma_min, 2)
    # the small slack keeps float rounding (231.0000000000018) from adding a level at an exact ratio
    return max(2, math.ceil(math.log(sigma_max / sigma_min) / math.log(ratio) - 1e-9) + 1)


# --------------------------------------------------------------------------------------------------
# NCSNv2 technique 4: the step size ε for T steps per level
# --------------------------------------------------------------------------------------------------


def technique4_value(step_lr: float, sigma_min: float, ratio: float, n_steps_each: int) -> float:
    """The NCSNv2 Eq. (6) quantity (ratio of the variance after T steps to σ_i²); 1 is ideal."""
    a = step_lr / sigma_min**2
    shrink = 1.0 - a
    floor = 2.0 * step_lr / (sigma_min**2 - sigma_min**2 * shrink**2)
    return shrink ** (2 * n_steps_each) * (ratio**2 - floor) + floor


def technique4_step_lr(sigma_min: float, ratio: float, n_steps_each: int) -> float:
    """The step size ε in (0, σ_L²) that brings ``technique4_value`` closest to 1.

    A dense log-spaced scan followed by golden-section refinement: the function has one minimum in the
    useful range, and the minimum sits at or above 1, so the argmin of |value − 1| is found reliably.
    """
    if n_steps_each < 1:
        raise ConfigError(f"n_steps_each must be >= 1 (got {n_steps_each})")

    def gap(log_eps: float) -> float:
        return abs(technique4_value(math.exp(log_eps), sigma_min, ratio, n_steps_each) - 1.0)

    hi = math.log(sigma_min**2) - 1e-9
    lo = hi - 25.0
    grid = [lo + (hi - lo) * k / 4000 for k in range(4001)]
    k_best = min(range(len(grid)), key=lambda k: gap(grid[k]))
    a, b = grid[max(k_best - 1, 0)], grid[min(k_best + 1, len(grid) - 1)]
    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
    for _ in range(100):
        c, d = b - inv_phi * (b - a), a + inv_phi * (b - a)
        if gap(c) < gap(d):
            b = d
        else:
            a = c
    return math.exp(0.5 * (a + b))


@dataclass(frozen=True)
class ScheduleSuggestion:
    """A σ schedule and step size chosen by the NCSNv2 rules."""

    sigma_max: float
    sigma_min: float
    num_scales: int
    ratio: float
    step_lr: float
    n_steps_each: int
    technique2: float

    def overrides(self) -> str:
        """The schedule as Hydra command-line overrides (with annealed Langevin, the sampler technique 4 sizes the
        step for, named, so they apply whatever sampler the experiment has)."""
        return (
            f"sigmas=geometric sigmas.sigma_max={self.sigma_max:.4g} sigmas.sigma_min={self.sigma_min:g} "
            f"sigmas.num_scales={self.num_scales} sampler=ald sampler.n_steps_each={self.n_steps_each} "
            f"sampler.step_lr={self.step_lr:.3g}"
        )


def suggest_schedule(
    data: torch.Tensor | None = None,
    *,
    sigma_max: float | None = None,
    sigma_min: float = 0.01,
    n_steps_each: int = 5,
    dim: int | None = None,
    target: float = 0.5,
) -> ScheduleSuggestion:
    """Pick σ_1 (technique 1, from ``data`` unless ``sigma_max`` is given), γ and L (technique 2) and
    ε (technique 4) for ``n_steps_each`` steps per level."""
    if sigma_max is None:
        if data is None:
            raise ConfigError("give data samples or sigma_max to suggest a schedule")
        sigma_max = largest_pairwise_distance(data)
    if dim is None:
        if data is None:
            raise ConfigError("give data samples or dim to suggest a schedule")
        dim = int(data[0].numel())
    ratio = technique2_ratio(dim, target)
    num_scales = num_scales_for_ratio(sigma_max, sigma_min, ratio)
    actual_ratio = (sigma_max / sigma_min) ** (1.0 / (num_scales - 1))
    step_lr = technique4_step_lr(sigma_min, actual_ratio, n_steps_each)
    return ScheduleSuggestion(
        sigma_max=float(sigma_max),
        sigma_min=float(sigma_min),
        num_scales=num_scales,
        ratio=actual_ratio,
        step_lr=step_lr,
        n_steps_each=n_steps_each,
        technique2=technique2_value(actual_ratio, dim),
    )


def ncsnv2_sigmas(
    data: torch.Tensor | None = None,
    *,
    sigma_max: float | None = None,
    sigma_min: float = 0.01,
    num_scales: int | None = None,
    dim: int | None = None,
) -> torch.Tensor:
    """A geometric schedule with σ_1 and L chosen by NCSNv2 techniques 1 and 2 (explicit values win)."""
    if sigma_max is None or num_scales is None:
        s = suggest_schedule(data, sigma_max=sigma_max, sigma_min=sigma_min, dim=dim)
        sigma_max = s.sigma_max if sigma_max is None else sigma_max
        num_scales = s.num_scales if num_scales is None else num_scales
    return geometric_sigmas(sigma_max, sigma_min, num_scales)



# ---------------------------------------------------------------------------------------------- σ bins (logging)
#: fixed log-σ bin edges of the per-σ validation losses: 1-2-5 per decade from 0.001 to 1000, the same in every run
SIGMA_BIN_EDGES: tuple[float, ...] = tuple(float(f"{m}e{e}") for e in range(-3, 3) for m in (1, 2, 5)) + (1000.0,)
SIGMA_BIN_PREFIX = "val/loss_sigma_bin/"


def _bin_edge(value: float) -> str:
    """An edge in fixed width (4 digits, a point, 3 decimals: ``0000.010``, ``0500.000``), so that the keys'
    plain string order, which W&B and most tools sort panels and columns by, is their numeric order."""
    return "inf" if math.isinf(value) else f"{value:08.3f}"


def sigma_bin_key(sigma: float) -> str:
    """The per-σ validation key of the fixed bin [lo, hi) holding ``sigma``, e.g.
    ``val/loss_sigma_bin/0000.500-0001.000`` (below 0.001: ``0000.000-0000.001``; from 1000 on: ``1000.000-inf``).
    The edges have a fixed width, so sorting the keys as text sorts them by σ. A float32 σ a hair below an edge
    (0.0099999998 for 0.01) counts as the edge."""
    edges = SIGMA_BIN_EDGES
    sigma = float(sigma) * (1 + 1e-6)
    if sigma < edges[0]:
        lo, hi = 0.0, edges[0]
    elif sigma >= edges[-1]:
        lo, hi = edges[-1], math.inf
    else:
        i = max(k for k in range(len(edges) - 1) if edges[k] <= sigma)
        lo, hi = edges[i], edges[i + 1]
    return f"{SIGMA_BIN_PREFIX}{_bin_edge(lo)}-{_bin_edge(hi)}"


def sigma_bin_low(key: str) -> float:
    """The lower edge of a ``sigma_bin_key`` key (also of the unpadded keys of older runs, ``.../0.5-1``)."""
    return float(key.removeprefix(SIGMA_BIN_PREFIX).split("-")[0])


def loss_by_sigma_bin(sigmas: list[float], sums: list[float], counts: list[float]) -> dict[str, float]:
    """Per-level loss sums and counts pooled into the fixed σ bins (``sigma_bin_key``): key → mean loss."""
    bins: dict[str, list[float]] = {}
    for sigma, s, c in zip(sigmas, sums, counts):
        if c > 0:
            acc = bins.setdefault(sigma_bin_key(sigma), [0.0, 0.0])
            acc[0] += s
            acc[1] += c
    return {key: s / c for key, (s, c) in bins.items()}


if __name__ == "__main__":  # python -m ncsn.sigmas suggest data=<name> steps_each=T
    # The command line lives in ncsn.tools.sigma_helper, which imports this module: run it as a script (as
    # `python -m ncsn.tools.sigma_helper` would) rather than import it, so that the dependency goes one way only.
    import runpy

    runpy.run_module("ncsn.tools.sigma_helper", run_name="__main__", alter_sys=True)
