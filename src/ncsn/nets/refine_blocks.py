"""The decoder blocks of the RefineNet-style score networks (Lin et al. 2017), conditioned (``Cond*``, NCSN) or
plain (NCSNv2); see ``ncsn.nets.layers`` for the two flavours and the encoder's residual blocks:

* RCU  (residual conv unit):      a few ``[norm] -> act -> conv3x3`` stages plus a skip;
* CRP  (chained residual pooling): repeated ``[norm] -> pool 5x5 -> conv3x3`` whose outputs
  are all added to the input;
* MSF  (multi-scale fusion):      one conv3x3 per input, resized bilinearly to a common
  shape and summed;
* Refine block = RCU per input -> MSF (if more than one input) -> CRP -> RCU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ncsn.nets.layers import NormFactory, conv3x3

# ----------------------------------------------------------------------------- RCU


class CondRCUBlock(nn.Module):
    """Residual conv unit: ``n_blocks`` residual groups of ``n_stages`` x (cond. norm, act, conv3x3)."""

    def __init__(
        self,
        features: int,
        n_blocks: int,
        n_stages: int,
        num_classes: int,
        normalizer: NormFactory,
        act: nn.Module,
    ) -> None:
        super().__init__()
        self.act = act
        self.layout: list[list[tuple[str, str]]] = []
        for i in range(n_blocks):
            group = []
            for j in range(n_stages):
                norm_name, conv_name = f"{i + 1}_{j + 1}_norm", f"{i + 1}_{j + 1}_conv"
                self.add_module(norm_name, normalizer(features, num_classes, bias=True))
                self.add_module(conv_name, conv3x3(features, features, bias=False))
                group.append((norm_name, conv_name))
            self.layout.append(group)

    def forward(self, x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        for group in self.layout:
            h = x
            for norm_name, conv_name in group:
                h = getattr(self, norm_name)(h, levels)
                h = getattr(self, conv_name)(self.act(h))
            x = x + h
        return x


class RCUBlock(nn.Module):
    """Unconditional residual conv unit: ``n_blocks`` groups of ``n_stages`` x (act, conv3x3), no norms."""

    def __init__(self, features: int, n_blocks: int, n_stages: int, act: nn.Module) -> None:
        super().__init__()
        self.act = act
        self.layout: list[list[str]] = []
        for i in range(n_blocks):
            group = []
            for j in range(n_stages):
                conv_name = f"{i + 1}_{j + 1}_conv"
                self.add_module(conv_name, conv3x3(features, features, bias=False))
                group.append(conv_name)
            self.layout.append(group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for group in self.layout:
            h = x
            for conv_name in group:
                h = getattr(self, conv_name)(self.act(h))
            x = x + h
        return x


# ----------------------------------------------------------------------------- CRP


class CondCRPBlock(nn.Module):
    """Chained residual pooling with conditional norms. Uses 5x5 *average* pooling (as NCSN does)."""

    def __init__(
        self, features: int, n_stages: int, num_classes: int, normalizer: NormFactory, act: nn.Module
    ) -> None:
        super().__init__()
        self.act = act
        self.norms = nn.ModuleList([normalizer(features, num_classes, bias=True) for _ in range(n_stages)])
        self.convs = nn.ModuleList([conv3x3(features, features, bias=False) for _ in range(n_stages)])
        self.pool = nn.AvgPool2d(kernel_size=5, stride=1, padding=2)

    def forward(self, x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        x = self.act(x)
        path = x
        for norm, conv in zip(self.norms, self.convs, strict=True):
            path = conv(self.pool(norm(path, levels)))
            x = x + path
        return x


class CRPBlock(nn.Module):
    """Unconditional chained residual pooling (no norms); 5x5 max pooling by default, else average."""

    def __init__(self, features: int, n_stages: int, act: nn.Module, maxpool: bool = True) -> None:
        super().__init__()
        self.act = act
        self.convs = nn.ModuleList([conv3x3(features, features, bias=False) for _ in range(n_stages)])
        pool_cls = nn.MaxPool2d if maxpool else nn.AvgPool2d
        self.pool = pool_cls(kernel_size=5, stride=1, padding=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(x)
        path = x
        for conv in self.convs:
            path = conv(self.pool(path))
            x = x + path
        return x


# ----------------------------------------------------------------------------- MSF


def _resize(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    if tuple(x.shape[2:]) == tuple(shape):
        return x  # bilinear resize with align_corners=True to the same size is the identity
    return F.interpolate(x, size=tuple(shape), mode="bilinear", align_corners=True)


class CondMSFBlock(nn.Module):
    """Multi-scale fusion: per input, cond. norm -> conv3x3 to ``features``; resize to ``shape``; sum."""

    def __init__(
        self, in_channels: Sequence[int], features: int, num_classes: int, normalizer: NormFactory
    ) -> None:
        super().__init__()
        self.convs = nn.ModuleList([conv3x3(c, features, bias=True) for c in in_channels])
        self.norms = nn.ModuleList([normalizer(c, num_classes, bias=True) for c in in_channels])

    def forward(self, xs: Sequence[torch.Tensor], levels: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        out = None
        for x, norm, conv in zip(xs, self.norms, self.convs, strict=True):
            h = _resize(conv(norm(x, levels)), shape)
            out = h if out is None else out + h
        return out


class MSFBlock(nn.Module):
    """Unconditional multi-scale fusion: per input conv3x3 to ``features``; resize to ``shape``; sum."""

    def __init__(self, in_channels: Sequence[int], features: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList([conv3x3(c, features, bias=True) for c in in_channels])

    def forward(self, xs: Sequence[torch.Tensor], shape: Sequence[int]) -> torch.Tensor:
        out = None
        for x, conv in zip(xs, self.convs, strict=True):
            h = _resize(conv(x), shape)
            out = h if out is None else out + h
        return out


# ----------------------------------------------------------------------------- Refine blocks


class CondRefineBlock(nn.Module):
    """RefineNet block with conditional norms.

    Args:
        in_channels: channel counts of the inputs (one for the first/coarsest block, two after).
        features: output channels.
        start: first block of the decoder (a single input, so no fusion).
        end: last block of the decoder (three output RCU groups instead of one).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        features: int,
        num_classes: int,
        normalizer: NormFactory,
        act: nn.Module,
        start: bool = False,
        end: bool = False,
    ) -> None:
        super().__init__()
        self.adapt_convs = nn.ModuleList(
            [CondRCUBlock(c, 2, 2, num_classes, normalizer, act) for c in in_channels]
        )
        self.output_convs = CondRCUBlock(features, 3 if end else 1, 2, num_classes, normalizer, act)
        self.fuse = len(in_channels) > 1
        if not start:
            self.msf = CondMSFBlock(in_channels, features, num_classes, normalizer)
        self.crp = CondCRPBlock(features, 2, num_classes, normalizer, act)

    def forward(
        self, xs: Sequence[torch.Tensor], levels: torch.Tensor, output_shape: Sequence[int]
    ) -> torch.Tensor:
        hs = [adapt(x, levels) for adapt, x in zip(self.adapt_convs, xs, strict=True)]
        h = self.msf(hs, levels, output_shape) if self.fuse else hs[0]
        return self.output_convs(self.crp(h, levels), levels)


class RefineBlock(nn.Module):
    """Unconditional RefineNet block (NCSNv2). Same layout as :class:`CondRefineBlock`."""

    def __init__(
        self,
        in_channels: Sequence[int],
        features: int,
        act: nn.Module,
        start: bool = False,
        end: bool = False,
        maxpool: bool = True,
    ) -> None:
        super().__init__()
        self.adapt_convs = nn.ModuleList([RCUBlock(c, 2, 2, act) for c in in_channels])
        self.output_convs = RCUBlock(features, 3 if end else 1, 2, act)
        self.fuse = len(in_channels) > 1
        if not start:
            self.msf = MSFBlock(in_channels, features)
        self.crp = CRPBlock(features, 2, act, maxpool=maxpool)

    def forward(self, xs: Sequence[torch.Tensor], output_shape: Sequence[int]) -> torch.Tensor:
        hs = [adapt(x) for adapt, x in zip(self.adapt_convs, xs, strict=True)]
        h = self.msf(hs, output_shape) if self.fuse else hs[0]
        return self.output_convs(self.crp(h))
