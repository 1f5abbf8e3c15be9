"""Score-matching objectives over a score callable ``score_fn(x, levels) -> score``.

Plain functions over tensors: no Lightning, no Hydra.

* ``dsm_loss``: the paper's weighted multi-σ denoising score matching (Eq. 5/6 of Song & Ermon 2019).
  For each sample a level i is drawn, x̃ = x + σ_i z, and the loss is
  ½ λ(σ_i) ‖s(x̃, i) + z/σ_i‖² summed over dimensions, λ(σ) = σ^p (p = 2: every level weighs the same),
  averaged over the batch. It also returns the per-level sums and counts so callers can log the loss of
  each σ (and average them exactly over a whole validation split, across processes).
* ``sliced_score_matching_loss``: variance-reduced sliced score matching (Song et al. 2019), for the toy
  and other low-dimensional data; annealed over the same levels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class LossOutput:
    """A batch loss and its per-level breakdown.

    ``loss`` is the batch mean (what is optimised); ``level_sum[i]`` the summed per-sample loss of the
    samples drawn at level i and ``level_count[i]`` how many there were, so that
    ``level_sum / level_count`` is the mean loss at σ_i and sums over batches or processes stay exact.
    """

    loss: torch.Tensor
    level_sum: torch.Tensor
    level_count: torch.Tensor
    #: DSM only (None for SSM), both summed over the batch, for spotting a collapsed network without a host
    #: sync: the loss a zero score would get on the same draws (½ σ^(p-2) ‖z‖², D/2 per sample when p = 2),
    #: and the mean square of the σ-scaled score σ·s (the NCSNv2 net's raw output; about 1 for a good
    #: network at small σ, 0 for a collapsed one). With EDM's preconditioning both are taken against the network
    #: whose body outputs zero (``dsm_loss(precondition=)``).
    zero_output_sum: torch.Tensor | None = None
    output_sq_sum: torch.Tensor | None = None

    def per_level_mean(self) -> torch.Tensor:
        """Mean loss at each level (NaN where no sample was drawn at that level)."""
        return self.level_sum / self.level_count


def sample_levels(
    batch_size: int, num_scales: int, device: torch.device, generator: torch.Generator | None = None,
    probs: torch.Tensor | None = None,
) -> torch.Tensor:
    """One random level index per sample: uniform (the paper), or drawn with probabilities ``probs`` [L]."""
    if probs is None:
        return torch.randint(0, num_scales, (batch_size,), device=device, generator=generator)
    return torch.multinomial(probs.to(device), batch_size, replacement=True, generator=generator)


def level_probabilities(sigmas: torch.Tensor, power: float) -> torch.Tensor | None:
    """Training draws of the levels, p(i) ∝ σ_i^(−power): None (uniform, the paper) for power 0; power > 0 draws
    the small σ (the fine detail) more often, power < 0 the large ones. The objective's λ(σ) is unchanged, so
    this shifts the network's effort between levels rather than estimating the same loss."""
    if power == 0:
        return None
    weights = sigmas.double() ** (-float(power))
    return (weights / weights.sum()).float()


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)


def _per_level(per_sample: torch.Tensor, levels: torch.Tensor, num_scales: int, **extra) -> LossOutput:
    per_sample = per_sample.float()
    level_sum = torch.zeros(num_scales, dtype=per_sample.dtype, device=per_sample.device)
    level_sum = level_sum.index_add(0, levels, per_sample.detach())
    # index_add rather than bincount: bincount synchronises with the host on CUDA
    level_count = torch.zeros_like(level_sum).index_add(0, levels, torch.ones_like(per_sample))
    return LossOutput(per_sample.mean(), level_sum, level_count, **extra)


def indexed_normal(index: torch.Tensor, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Standard-normal noise [len(index), *shape] (CPU, float32) whose row for sample j depends only on (seed, j):
    the same draw for a sample whatever the batch it is in, the batch size or the number of processes."""
    out = torch.empty(len(index), *shape)
    generator = torch.Generator()
    for row, j in zip(out, index.tolist(), strict=True):
        generator.manual_seed(int(seed) * 1_000_003 + int(j))
        row.normal_(generator=generator)
    return out


def dsm_loss(
    score_fn: ScoreFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    levels: torch.Tensor | None = None,
    *,
    weight_power: float = 2.0,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    level_probs: torch.Tensor | None = None,
    continuous: bool = False,
    log_normal: tuple[float, float] | None = None,
    precondition: tuple[float, float] | None = None,
) -> LossOutput:
    """Weighted multi-σ denoising score matching.

    Args:
        score_fn: ``score_fn(x_noisy, levels)`` returning the estimated score, shaped like ``x``.
        x: clean data, shape [B, ...], in the model range.
        sigmas: the noise levels [L], decreasing.
        levels: level index per sample [B]; drawn uniformly when omitted.
        weight_power: p in λ(σ) = σ^p (the paper uses 2).
        noise: the standard-normal z [B, ...]; drawn when omitted.
        generator: random generator for the level and noise draws.
        level_probs: the levels' draw probabilities [L] when ``levels`` is omitted (``level_probabilities``;
            None: uniform).
        continuous: draw σ itself log-uniformly between σ_L and σ_1 (the continuous form of the paper's
            uniform level draws on a geometric list) when ``levels`` is omitted, and ask ``score_fn`` for the
            score at that σ (a float tensor [B]); the per-level breakdown files each sample under the nearest
            level in log σ. For networks that ignore σ or take it (NCSNv2, ``sigma_embedding``), not for
            level-indexed ones.
        log_normal: (mean, std) of ln σ: draw σ log-normally (EDM's P_mean, P_std) when ``levels`` is omitted,
            clamped to [σ_L, σ_1], and ask ``score_fn`` for the score at that σ (as ``continuous``).
        precondition: (σ_d, centre) of a network with EDM's preconditioning (``NCSNv2(precondition="edm")``): λ(σ)
            is multiplied by (σ² + σ_d²)/σ_d², EDM's weight, under which the network's body is fitted with the same
            weight at every σ; and the collapse references are the network with its body at zero (the score of
            N(centre, σ_d² + σ²), what c_skip alone gives) instead of a zero score: ``zero_output_sum`` is that
            network's loss, ``output_sq_sum`` the mean square of σ·(s − its score), the body's part.
    """
    num_scales = sigmas.shape[0]
    table = sigmas.to(x.device, x.dtype)
    if levels is None and (continuous or log_normal is not None):
        log_hi, log_lo = table[0].log(), table[-1].log()
        if log_normal is not None:
            n = torch.randn(x.shape[0], device=x.device, generator=generator, dtype=x.dtype)
            sigma_drawn = (float(log_normal[0]) + float(log_normal[1]) * n).clamp(log_lo, log_hi).exp()
        else:
            u = torch.rand(x.shape[0], device=x.device, generator=generator, dtype=x.dtype)
            sigma_drawn = (log_hi + u * (log_lo - log_hi)).exp()
        levels = (sigma_drawn.log()[:, None] - table.log()).abs().argmin(dim=1)
    else:
        sigma_drawn = None
        if levels is None:
            levels = sample_levels(x.shape[0], num_scales, x.device, generator, level_probs)
    if noise is None:
        noise = _randn_like(x, generator)
    used = (table[levels] if sigma_drawn is None else sigma_drawn).view(-1, *([1] * (x.ndim - 1)))
    x_noisy = x + used * noise
    score = score_fn(x_noisy, levels if sigma_drawn is None else sigma_drawn)
    # ½ σ^p ‖s + z/σ‖²; computed in fp32 so the loss stays exact under autocast.
    sigma = used.float()
    residual = score.float() + noise.float() / sigma
    weight = sigma.flatten() ** weight_power
    baseline = None  # the score the collapse checks compare with: zero, or the skip path of a preconditioned net
    if precondition is not None:
        sigma_data, centre = float(precondition[0]), float(precondition[1])
        weight = weight * (sigma.flatten().square() + sigma_data**2) / sigma_data**2
        baseline = -(x_noisy.float() - centre) / (sigma.square() + sigma_data**2)
    per_sample = 0.5 * residual.pow(2).flatten(1).sum(dim=1) * weight
    with torch.no_grad():
        reference = noise.float() / sigma if baseline is None else baseline + noise.float() / sigma
        zero_output = 0.5 * reference.pow(2).flatten(1).sum(dim=1) * weight
        body = score.detach().float() if baseline is None else score.detach().float() - baseline
        output_sq = (body * sigma).pow(2).flatten(1).mean(dim=1)
    return _per_level(per_sample, levels, num_scales, zero_output_sum=zero_output.sum(),
                      output_sq_sum=output_sq.sum())


def sliced_score_matching_loss(
    score_fn: ScoreFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    levels: torch.Tensor | None = None,
    *,
    n_projections: int = 1,
    weight_power: float = 2.0,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> LossOutput:
    """Annealed, variance-reduced sliced score matching (SSM-VR).

    The data are perturbed with N(0, σ_i²) as in DSM, then the loss at x̃ is
    E_v[vᵀ ∇ₓ(vᵀ s)] + ½ ‖s‖² with Gaussian projections v (the variance-reduced form integrates the
    projection of ½‖s‖² analytically), weighted by σ_i^p. Needs ``create_graph`` through the score, so
    it costs about three network passes; use it on toy and low-dimensional data. ``noise``: the perturbation's
    standard-normal z [B, ...] (drawn when omitted; the projections always come from ``generator``).
    """
    num_scales = sigmas.shape[0]
    if levels is None:
        levels = sample_levels(x.shape[0], num_scales, x.device, generator)
    used = sigmas.to(x.device, x.dtype)[levels].view(-1, *([1] * (x.ndim - 1)))
    noise = _randn_like(x, generator) if noise is None else noise
    x_noisy = (x + used * noise).detach().requires_grad_(True)
    per_sample = torch.zeros(x.shape[0], device=x.device, dtype=torch.float32)
    for _ in range(n_projections):
        score = score_fn(x_noisy, levels)
        v = _randn_like(x_noisy, generator)
        grad_v = torch.autograd.grad((score * v).sum(), x_noisy, create_graph=True)[0]
        trace_term = (grad_v * v).flatten(1).sum(dim=1)
        norm_term = 0.5 * score.pow(2).flatten(1).sum(dim=1)
        per_sample = per_sample + (trace_term + norm_term).float()
    per_sample = per_sample / n_projections * used.flatten().float() ** weight_power
    return _per_level(per_sample, levels, num_scales)
