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

:func:`score_function` turns a network and its noise schedule into ``s(x, levels)``; it is
the only place that knows how a network is parameterised.
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
    "ConditionalInstanceNorm2dPlus",
    "InstanceNorm2dPlus",
    "NCSNv2",
    "NCSNv2Deeper",
    "NCSNv2Deepest",
    "ToyScoreMLP",
    "score_function",
]


def score_function(net: nn.Module, sigmas: torch.Tensor) -> ScoreFn:
    """Return ``s(x, levels)``, the score estimate of ``net`` under noise schedule ``sigmas``.

    Args:
        net: a network following the interface above.
        sigmas: 1-D float tensor of noise levels, ``sigmas[0]`` the largest.

    Returns:
        ``net(x, levels) / sigmas[levels]`` (broadcast over the non-batch dims) if
        ``net.divide_by_sigma``, else ``net(x, levels)``.
    """
    if not getattr(net, "divide_by_sigma", False):

        def raw_score(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
            return net(x, levels)

        return raw_score

    def scaled_score(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        out = net(x, levels)
        sig = sigmas.to(device=out.device, dtype=out.dtype)[levels.to(out.device)]
        return out / sig.view(-1, *([1] * (out.dim() - 1)))

    return scaled_score
