"""Small noise-conditional score MLP for 2-D toy data."""

from __future__ import annotations

import torch
from torch import nn

from ncsn.nets.layers import check_sizes


class ToyScoreMLP(nn.Module):
    """MLP score model for low-dimensional data.

    The input is ``concat(x, e[level])`` where ``e`` is a learned embedding of the noise level,
    followed by ``num_layers`` hidden layers of width ``hidden`` with softplus activations and
    a linear read-out of size ``dim``. As in NCSNv2 the raw output is divided by sigma to give
    the score (``divide_by_sigma = True``; done by :func:`ncsn.nets.score_function`), which keeps
    the output of order one at every noise level.

    Args:
        dim: data dimension.
        hidden: hidden width (also the default level-embedding size).
        num_scales: number of noise levels.
        num_layers: number of hidden layers (>= 1).
        embed_dim: size of the level embedding; defaults to ``hidden``.
    """

    divide_by_sigma = True
    noise_input = "level"  # a learned embedding per trained level

    def __init__(
        self,
        dim: int = 2,
        hidden: int = 128,
        num_scales: int = 10,
        num_layers: int = 3,
        embed_dim: int | None = None,
    ) -> None:
        super().__init__()
        check_sizes(dim=dim, hidden=hidden, num_layers=num_layers, embed_dim=embed_dim)
        self.dim = dim
        self.num_scales = num_scales
        embed_dim = hidden if embed_dim is None else embed_dim
        self.level_embedding = nn.Embedding(num_scales, embed_dim)

        layers: list[nn.Module] = [nn.Linear(dim + embed_dim, hidden), nn.Softplus()]
        for _ in range(num_layers - 1):
            layers += [nn.Linear(hidden, hidden), nn.Softplus()]
        layers.append(nn.Linear(hidden, dim))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """Raw output [B, dim] for points ``x`` [B, dim] at noise ``levels`` [B] (no rescaling)."""
        return self.mlp(torch.cat([x, self.level_embedding(levels)], dim=1))
