"""Score networks (plain PyTorch: no Lightning or Hydra imports).

Common interface of every network ``net``:

* ``net(x, levels)`` where ``x`` is a batch in the data's *model range* -- images
  ``[B, C, H, W]`` in [0, 1], or points ``[B, D]`` for :class:`ToyScoreMLP` -- and ``levels``
  is a LongTensor ``[B]`` of indices into the noise schedule (0 = largest sigma). It returns
  the RAW network output, shaped like ``x``.
* Input rescaling: the image networks (:class:`NCSN`, :class:`NCSNv2` and its deeper variants)
  map [0, 1] to [-1, 1] with ``2 * x - 1`` as their first operation when built with
  ``rescale_input=True`` (the default, as in the official code). Pass ``rescale_input=False``
  if the data are already centred (or logit-transformed). :class:`ToyScoreMLP` never rescales.
* ``net.divide_by_sigma`` (class attribute) says how the raw output relates to the score:
  ``False`` -- the output *is* the score (NCSN, noise-conditional normalisation);
  ``True``  -- score = output / sigma (NCSNv2, NCSNv2Deeper, NCSNv2Deepest, ToyScoreMLP).

:func:`score_function` turns a network and its noise schedule into ``s(x, levels)`` (or ``s(x, σ)`` at a
real σ, for the few-step samplers); it is the only place that knows how a network is parameterised.
``net.noise_input`` says how the network takes the noise level (:func:`noise_input`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ncsn.nets.mlp import ToyScoreMLP
from ncsn.nets.ncsnv2 import NCSNv2, NCSNv2Deeper, NCSNv2Deepest
from ncsn.nets.normalization import ConditionalInstanceNorm2dPlus, InstanceNorm2dPlus
from ncsn.nets.refinenet import NCSN

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

__all__ = [
    "NCSN",
    "NOISE_INPUTS",
    "ConditionalInstanceNorm2dPlus",
    "InstanceNorm2dPlus",
    "NCSNv2",
    "NCSNv2Deeper",
    "NCSNv2Deepest",
    "ScoreFunction",
    "ToyScoreMLP",
    "noise_input",
    "score_function",
]


#: how a network takes the noise level (its ``noise_input`` attribute; "level" when it has none)
NOISE_INPUTS = ("level", "none", "sigma")


def noise_input(net: object) -> str:
    """``"level"``: ``net(x, levels)`` indexes a table per trained level (NCSN's CondInstanceNorm++, the toy
    MLP); ``"none"``: the network ignores its second argument (NCSNv2: s = net(x)/σ); ``"sigma"``:
    ``net(x, sigma)`` takes σ itself as a float tensor [B] (continuous σ conditioning)."""
    kind = getattr(net, "noise_input", "level")
    if kind not in NOISE_INPUTS:
        raise ValueError(f"{type(net).__name__}.noise_input must be one of {NOISE_INPUTS} (got {kind!r})")
    return kind


class ScoreFunction:
    """s(x, σ) of a network under its noise schedule: the ONE place that knows how a network is parameterised.

    ``score(x, noise)`` takes ``noise`` as either a LongTensor [B] of level indices into ``sigmas`` (training,
    the level samplers) or a float tensor [B] of σ values (the few-step samplers, which ask for s at a real σ).
    A network that ignores σ or takes σ itself is evaluated at exactly that σ; a level-indexed network is
    evaluated at the trained level nearest in log σ (EDM's ``round_sigma``), and :meth:`snap` tells a sampler
    which σ that is, so its step can use it. The score is ``net(x, ·) / σ`` when ``net.divide_by_sigma`` (with
    the σ the network saw), else the raw output.
    """

    def __init__(self, net: nn.Module, sigmas: torch.Tensor) -> None:
        self.net, self.sigmas = net, sigmas
        self.noise_input = noise_input(net)
        self.divide_by_sigma = bool(getattr(net, "divide_by_sigma", False))

    def nearest_levels(self, sigma: torch.Tensor) -> torch.Tensor:
        """The index of the trained level nearest to each σ in log σ (LongTensor like ``sigma``)."""
        table = self.sigmas.to(device=sigma.device, dtype=torch.float32).log()
        wanted = sigma.to(torch.float32).clamp_min(1e-30).log()
        return (wanted.unsqueeze(-1) - table).abs().argmin(dim=-1)

    def snap(self, sigma: torch.Tensor) -> torch.Tensor:
        """The σ the network is evaluated at for each wanted ``sigma``: itself, or the nearest trained level."""
        if self.noise_input != "level":
            return sigma
        return self.sigmas.to(device=sigma.device, dtype=sigma.dtype)[self.nearest_levels(sigma)]

    def __call__(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        table = self.sigmas.to(device=x.device, dtype=x.dtype)
        if noise.dtype.is_floating_point:
            if self.noise_input == "level":
                levels = self.nearest_levels(noise)
                sigma = table[levels]
            else:
                levels, sigma = None, noise.to(device=x.device, dtype=x.dtype)
        else:
            levels = noise.to(x.device)
            sigma = table[levels]
        if self.noise_input == "sigma":
            out = self.net(x, sigma)
        else:
            out = self.net(x, levels if levels is not None else torch.zeros_like(sigma, dtype=torch.long))
        if not self.divide_by_sigma:
            return out
        return out / sigma.to(out.dtype).view(-1, *([1] * (out.dim() - 1)))


def score_function(net: nn.Module, sigmas: torch.Tensor) -> ScoreFunction:
    """Return ``s(x, noise)``, the score estimate of ``net`` under noise schedule ``sigmas`` (see
    :class:`ScoreFunction`: ``noise`` is level indices or σ values).

    Args:
        net: a network following the interface above.
        sigmas: 1-D float tensor of noise levels, ``sigmas[0]`` the largest.
    """
    return ScoreFunction(net, sigmas)
