"""Building blocks of the RefineNet-style score networks (NCSN and NCSNv2).

Every block comes in two flavours:

* ``Cond*`` / ``ConditionalResidualBlock``: normalisation layers are conditioned on the
  noise level, ``forward(x, levels)`` (NCSN, Song & Ermon 2019);
* the plain version: unconditional normalisation or none at all, ``forward(x)``
  (NCSNv2, Song & Ermon 2020).

The encoder is made of residual blocks (this module), the decoder of RefineNet blocks (Lin et al. 2017;
``ncsn.nets.refine_blocks``):

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

from collections.abc import Callable

import torch
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
