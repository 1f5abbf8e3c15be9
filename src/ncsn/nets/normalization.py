"""Instance normalisation "plus" (InstanceNorm++), conditional and unconditional.

Plain instance normalisation removes each channel's spatial mean, which erases
the relative brightness/colour of the channels and makes samples drift in colour.
InstanceNorm++ (Song & Ermon 2019, appendix A.1) adds that information back:

    mu_c      = spatial mean of channel c
    m, v      = mean and (unbiased) variance of mu_c over the channels
    h_c       = (x_c - mu_c) / sqrt(var(x_c) + eps) + alpha_c * (mu_c - m) / sqrt(v + eps)
    out_c     = gamma_c * h_c + beta_c

In the conditional version (NCSN) ``gamma``, ``alpha`` and ``beta`` are looked up
per noise level from one embedding table of width ``3 * C`` laid out as
``[gamma | alpha | beta]``; in the unconditional version (NCSNv2) they are plain
per-channel parameters. ``gamma`` and ``alpha`` start at N(1, 0.02), ``beta`` at 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_EPS = 1e-5


def _normalise_plus(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (instance-normalised x, standardised channel means) for x of shape [B, C, H, W]."""
    channel_means = x.mean(dim=(2, 3))  # [B, C]
    centre = channel_means.mean(dim=1, keepdim=True)
    spread = channel_means.var(dim=1, keepdim=True)
    standardised_means = (channel_means - centre) / torch.sqrt(spread + _EPS)
    normalised = F.instance_norm(x, eps=_EPS)
    return normalised, standardised_means


class ConditionalInstanceNorm2dPlus(nn.Module):
    """InstanceNorm++ whose affine parameters depend on the noise level.

    Args:
        num_features: number of channels C.
        num_classes: number of noise levels (rows of the embedding table).
        bias: if True the table also holds a per-level shift ``beta``.
    """

    def __init__(self, num_features: int, num_classes: int, bias: bool = True) -> None:
        super().__init__()
        self.num_features = num_features
        self.bias = bias
        n_params = 3 if bias else 2
        self.embed = nn.Embedding(num_classes, n_params * num_features)
        with torch.no_grad():
            self.embed.weight[:, : 2 * num_features].normal_(1.0, 0.02)
            if bias:
                self.embed.weight[:, 2 * num_features :].zero_()

    def forward(self, x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        h, means = _normalise_plus(x)
        params = self.embed(levels)  # [B, n_params * C]
        c = self.num_features
        gamma = params[:, :c, None, None]
        alpha = params[:, c : 2 * c, None, None]
        out = gamma * (h + alpha * means[:, :, None, None])
        if self.bias:
            out = out + params[:, 2 * c :, None, None]
        return out


class InstanceNorm2dPlus(nn.Module):
    """Unconditional InstanceNorm++ with learned per-channel ``gamma``, ``alpha`` and ``beta``.

    Args:
        num_features: number of channels C.
        bias: if True a per-channel shift ``beta`` is learned.
    """

    def __init__(self, num_features: int, bias: bool = True) -> None:
        super().__init__()
        self.num_features = num_features
        self.bias = bool(bias)
        self.alpha = nn.Parameter(torch.empty(num_features).normal_(1.0, 0.02))
        self.gamma = nn.Parameter(torch.empty(num_features).normal_(1.0, 0.02))
        if self.bias:
            self.beta = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, means = _normalise_plus(x)
        h = h + self.alpha[None, :, None, None] * means[:, :, None, None]
        out = self.gamma[None, :, None, None] * h
        if self.bias:
            out = out + self.beta[None, :, None, None]
        return out


class SigmaEmbedding(nn.Module):
    """A continuous embedding of the noise level: t = log σ through fixed sinusoids (periods from about 0.8 to
    25 in log σ, so both the σ range of a schedule and its neighbouring levels are told apart), then a small
    MLP to ``dim`` features. The networks that take σ itself (``noise_input = "sigma"``) compute it once per
    forward and hand it to every :class:`SigmaInstanceNorm2dPlus`."""

    def __init__(self, dim: int, num_frequencies: int = 8) -> None:
        super().__init__()
        self.register_buffer("frequencies", 2.0 ** torch.arange(num_frequencies, dtype=torch.float32) / 4.0,
                             persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * num_frequencies + 1, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        t = sigma.float().clamp_min(1e-12).log()[:, None]
        phase = t * self.frequencies
        return self.mlp(torch.cat([t, phase.sin(), phase.cos()], dim=1))


class SigmaInstanceNorm2dPlus(InstanceNorm2dPlus):
    """InstanceNorm++ conditioned on a continuous σ embedding: the per-channel ``gamma``, ``alpha``, ``beta`` of
    :class:`InstanceNorm2dPlus` plus a linear map of the embedding (zero at initialisation, so an untrained
    network starts as the unconditional one). The same call signature as :class:`ConditionalInstanceNorm2dPlus`
    (``num_classes`` is the embedding width), so the conditional residual blocks take it as they are.
    """

    def __init__(self, num_features: int, num_classes: int, bias: bool = True) -> None:
        super().__init__(num_features, bias)
        self.film = nn.Linear(num_classes, 3 * num_features)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        h, means = _normalise_plus(x)
        c = self.num_features
        shift = self.film(embedding)[:, :, None, None]
        gamma = self.gamma[None, :, None, None] + shift[:, :c]
        alpha = self.alpha[None, :, None, None] + shift[:, c : 2 * c]
        out = gamma * (h + alpha * means[:, :, None, None])
        if self.bias:
            out = out + self.beta[None, :, None, None] + shift[:, 2 * c :]
        return out
