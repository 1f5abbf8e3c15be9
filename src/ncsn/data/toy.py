"""The paper's 2-D toy mixture ``1/5 N((-5,-5), I) + 4/5 N((5,5), I)``: samples (labels = component index) and
its analytic density and score under Gaussian perturbation (``gmm_sample``, ``gmm_log_prob``,
``gmm_perturbed_score``), for ``data=toy_gmm``, the toy quality metric and the sampler tests."""

from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset, TensorDataset

from ncsn.errors import ConfigError

GMM_WEIGHTS = torch.tensor([0.2, 0.8])
GMM_MEANS = torch.tensor([[-5.0, -5.0], [5.0, 5.0]])
GMM_STD = 1.0


def gmm_sample(n: int, generator: torch.Generator | None = None, *,
               return_components: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples [n, 2] of the mixture (and their component indices [n] when ``return_components``)."""
    comp = torch.multinomial(GMM_WEIGHTS, n, replacement=True, generator=generator)
    x = GMM_MEANS[comp] + GMM_STD * torch.randn(n, 2, generator=generator)
    return (x, comp) if return_components else x


def _gmm_terms(x: torch.Tensor, sigma: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log w_k - |x - mu_k|^2 / (2 var)) [..., K], mu - x [..., K, 2], var [..., 1] for the perturbed mixture."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim > 0 and sigma.ndim == x.ndim - 1:  # per-sample sigmas [N] for x [N, 2]
        sigma = sigma[..., None]
    var = GMM_STD**2 + sigma**2  # [..., 1] or scalar
    var = var if var.ndim > 0 else var[None]
    means = GMM_MEANS.to(x)
    diff = means - x[..., None, :]  # [..., K, 2]
    logits = GMM_WEIGHTS.to(x).log() - diff.pow(2).sum(-1) / (2 * var)  # [..., K]
    return logits, diff, var


def gmm_log_prob(x: torch.Tensor, sigma: float | torch.Tensor = 0.0) -> torch.Tensor:
    """log density [...] of the mixture convolved with N(0, sigma^2 I) at ``x`` [..., 2]."""
    logits, _, var = _gmm_terms(x, sigma)
    return torch.logsumexp(logits, dim=-1) - torch.log(2 * math.pi * var[..., 0])


def gmm_perturbed_score(x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """Exact score grad_x log p_sigma(x) [..., 2] of the mixture convolved with N(0, sigma^2 I).

    ``sigma``: a float or a tensor broadcastable to ``x[..., :1]`` (e.g. [N, 1]; [N] is taken per sample).
    p_sigma = sum_k w_k N(mu_k, (1 + sigma^2) I), so the score is sum_k r_k(x) (mu_k - x) / (1 + sigma^2) with
    responsibilities r = softmax(logits) computed through logsumexp (stable far from both modes).
    """
    logits, diff, var = _gmm_terms(x, sigma)
    resp = torch.exp(logits - torch.logsumexp(logits, dim=-1, keepdim=True))
    return (resp[..., None] * diff).sum(-2) / var


def toy_gmm_datasets(n_train: int = 10000, n_val: int = 2000, seed: int = 0) -> tuple[Dataset, Dataset]:
    """``(x [2], component)`` samples of the mixture; train then val drawn from one generator seeded ``seed``."""
    if n_train < 1 or n_val < 1:
        raise ConfigError(f"data.n_train={n_train} and data.n_val={n_val} must both be at least 1")
    g = torch.Generator().manual_seed(seed)
    return (TensorDataset(*gmm_sample(n_train, g, return_components=True)),
            TensorDataset(*gmm_sample(n_val, g, return_components=True)))
