"""Building blocks of the RefineNet-style score networks (NCSN and NCSNv2).

Every block comes in two flavours:

* ``Cond*`` / ``ConditionalResidualBlock``: normalisation layers are conditioned on the
  noise level, ``forward(x, levels)`` (NCSN, Song & Ermon 2019);
* the plain version: unconditional normalisation or none at all, ``forward(x)``
  (NCSNv2, Song & Ermon 2020).

The encoder is made of residual blocks, the decoder of RefineNet blocks (Lin et al. 2017):

* RCU  (residual conv unit):      a few ``[norm] -> act -> conv3x3`` stages plus a skip;
* CRP  (chained residual pooling): repeated ``[norm] -> pool 5x5 -> conv3x3`` whose outputs
  are all added to the input;
* MSF  (multi-scale fusion):      one conv3x3 per input, resized bilinearly to a common
  shape and summed;
* Refine block = RCU per input -> MSF (if more than one input) -> CRP -> RCU.

Submodule names (``adapt_convs``, ``output_convs``, ``msf``, ``crp``, ``1_1_conv`` ...)
follow the official implementations so that their state dicts map one to one onto ours.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ncsn.errors import ConfigError


def check_sizes(**sizes: int) -> None:
    """Each network size (``ngf=64``, ``image_size=28``) must be a whole number >= 1: one clear line naming the
    setting (``model.net.<name>``) instead of a deep error while the layers are built."""
    for name, value in sizes.items():
        if value is None:
            continue
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise ConfigError(f"model.net.{name} must be a whole number >= 1 (got {value})")

# A factory building a normalisation layer: (channels) or (channels, num_classes).
NormFactory = Callable[..., nn.Module]


# ----------------------------------------------------------------------------- convolutions


def conv3x3(in_channels: int, out_channels: int, bias: bool = True, dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution, stride 1, padded so the spatial size is preserved (also when dilated)."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=dilation, dilation=dilation, bias=bias)


def conv1x1(in_channels: int, out_channels: int, bias: bool = True) -> nn.Conv2d:
    """1x1 convolution."""
    return nn.Conv2d(in_channels, out_channels, 1, stride=1, padding=0, bias=bias)


def _mean_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """Average each 2x2 block (drops a trailing odd row/column, like the reference code)."""
    return (x[:, :, ::2, ::2] + x[:, :, 1::2, ::2] + x[:, :, ::2, 1::2] + x[:, :, 1::2, 1::2]) / 4.0


class ConvMeanPool(nn.Module):
    """Convolution (stride 1, "same" padding) followed by 2x2 mean pooling: halves H and W.

    ``adjust_padding`` first pads one zero row on top and one zero column on the left, so an
    odd-sized result (e.g. 7 -> 8) can be pooled without losing a row (used for 28x28 data).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        bias: bool = True,
        adjust_padding: bool = False,
    ) -> None:
        super().__init__()
        conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=1, padding=kernel_size // 2, bias=bias
        )
        # The Sequential wrapper keeps the reference state-dict key ("conv.1.weight").
        self.conv = nn.Sequential(nn.ZeroPad2d((1, 0, 1, 0)), conv) if adjust_padding else conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _mean_pool_2x2(self.conv(x))


# ----------------------------------------------------------------------------- residual blocks


def _residual_convs(
    in_channels: int,
    out_channels: int,
    resample: str | None,
    dilation: int | None,
    adjust_padding: bool,
) -> tuple[nn.Module, int, nn.Module, nn.Module | None]:
    """Build ``(conv1, mid_channels, conv2, shortcut)`` for a (conditional) residual block.

    * ``resample='down'`` without dilation: conv1 keeps ``in_channels``, conv2 is a
      ConvMeanPool to ``out_channels``; the shortcut is a 1x1 ConvMeanPool. Halves H, W.
    * ``resample='down'`` with dilation: same channel layout, but all three convolutions
      are dilated 3x3 convs and the resolution is NOT reduced (the dilation enlarges the
      receptive field instead; ``adjust_padding`` has no effect in this case).
    * ``resample=None``: conv1 maps to ``out_channels`` directly; a shortcut conv exists
      only when the channel count changes.
    """
    dil = dilation or 1
    if resample == "down":
        mid = in_channels
        conv1 = conv3x3(in_channels, mid, dilation=dil)
        if dilation is not None:
            conv2: nn.Module = conv3x3(mid, out_channels, dilation=dil)
            shortcut: nn.Module | None = conv3x3(in_channels, out_channels, dilation=dil)
        else:
            conv2 = ConvMeanPool(mid, out_channels, 3, adjust_padding=adjust_padding)
            shortcut = ConvMeanPool(in_channels, out_channels, 1, adjust_padding=adjust_padding)
    elif resample is None:
        mid = out_channels
        conv1 = conv3x3(in_channels, mid, dilation=dil)
        conv2 = conv3x3(mid, out_channels, dilation=dil)
        if in_channels == out_channels:
            shortcut = None
        elif dilation is not None:
            shortcut = conv3x3(in_channels, out_channels, dilation=dil)
        else:
            shortcut = conv1x1(in_channels, out_channels)
    else:
        raise ValueError(f"resample must be None or 'down', got {resample!r}")
    return conv1, mid, conv2, shortcut


class ConditionalResidualBlock(nn.Module):
    """Pre-activation residual block ``norm -> act -> conv -> norm -> act -> conv`` + shortcut,
    with noise-level-conditioned normalisation. See :func:`_residual_convs` for the layout."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_classes: int,
        normalization: NormFactory,
        resample: str | None = None,
        act: nn.Module | None = None,
        adjust_padding: bool = False,
        dilation: int | None = None,
    ) -> None:
        super().__init__()
        self.act = act if act is not None else nn.ELU()
        conv1, mid, conv2, shortcut = _residual_convs(
            in_channels, out_channels, resample, dilation, adjust_padding
        )
        self.conv1 = conv1
        self.normalize2 = normalization(mid, num_classes)
        self.conv2 = conv2
        if shortcut is not None:
            self.shortcut = shortcut
        self.has_shortcut_conv = shortcut is not None
        self.normalize1 = normalization(in_channels, num_classes)

    def forward(self, x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.normalize1(x, levels)))
        h = self.conv2(self.act(self.normalize2(h, levels)))
        skip = self.shortcut(x) if self.has_shortcut_conv else x
        return skip + h


class ResidualBlock(nn.Module):
    """Unconditional counterpart of :class:`ConditionalResidualBlock` (NCSNv2)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        normalization: NormFactory,
        resample: str | None = None,
        act: nn.Module | None = None,
        adjust_padding: bool = False,
        dilation: int | None = None,
    ) -> None:
        super().__init__()
        self.act = act if act is not None else nn.ELU()
        conv1, mid, conv2, shortcut = _residual_convs(
            in_channels, out_channels, resample, dilation, adjust_padding
        )
        self.conv1 = conv1
        self.normalize2 = normalization(mid)
        self.conv2 = conv2
        if shortcut is not None:
            self.shortcut = shortcut
        self.has_shortcut_conv = shortcut is not None
        self.normalize1 = normalization(in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.normalize1(x)))
        h = self.conv2(self.act(self.normalize2(h)))
        skip = self.shortcut(x) if self.has_shortcut_conv else x
        return skip + h


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
