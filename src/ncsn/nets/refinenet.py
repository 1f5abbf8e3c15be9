"""NCSN score network (Song & Ermon 2019): a noise-conditional dilated RefineNet.

Architecture (``ngf`` = base width, C = image channels):

    begin_conv 3x3: C -> ngf
    res1: 2 residual blocks, ngf,            full resolution
    res2: 2 residual blocks, ngf -> 2 ngf,   first one halves H and W (ConvMeanPool)
    res3: 2 residual blocks, 2 ngf,          dilation 2, resolution kept
    res4: 2 residual blocks, 2 ngf,          dilation 4, resolution kept
    refine1..4: RefineNet decoder fusing res4 -> res1 back to full resolution
    InstanceNorm++ -> ELU -> end_conv 3x3: ngf -> C

Every normalisation layer is a :class:`ConditionalInstanceNorm2dPlus` indexed by the
noise level. The output is used directly as the score estimate (no division by sigma).
"""

from __future__ import annotations

import torch
from torch import nn

from ncsn.nets.layers import ConditionalResidualBlock, check_sizes
from ncsn.nets.normalization import ConditionalInstanceNorm2dPlus
from ncsn.nets.refine_blocks import CondRefineBlock


class NCSN(nn.Module):
    """Conditional dilated RefineNet ("CondRefineNetDilated") of the original NCSN paper.

    Args:
        in_channels: image channels (1 for MNIST, 3 for CIFAR-10/CelebA).
        image_size: image side length. Only 28 changes anything in the reference
            (``adjust_padding`` in the first ``res4`` block), and since that block is dilated
            the flag has no effect there; it is kept for fidelity. 28, 32 and 64 all work
            (any size that is even works).
        ngf: base number of feature maps.
        num_scales: number of noise levels L (rows of every conditional embedding).
        rescale_input: map inputs from [0, 1] to [-1, 1] with ``2x - 1`` before the first conv.
    """

    divide_by_sigma = False
    noise_input = "level"  # conditional instance norm++ looks its parameters up per trained level

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        ngf: int = 64,
        num_scales: int = 10,
        rescale_input: bool = True,
    ) -> None:
        super().__init__()
        check_sizes(in_channels=in_channels, image_size=image_size, ngf=ngf)
        self.in_channels = in_channels
        self.image_size = image_size
        self.ngf = ngf
        self.num_scales = num_scales
        self.rescale_input = rescale_input

        norm = ConditionalInstanceNorm2dPlus
        act = nn.ELU()
        self.act = act
        wide = 2 * ngf

        def block(cin: int, cout: int, **kwargs) -> ConditionalResidualBlock:
            return ConditionalResidualBlock(cin, cout, num_scales, norm, act=act, **kwargs)

        self.begin_conv = nn.Conv2d(in_channels, ngf, 3, stride=1, padding=1)
        self.normalizer = norm(ngf, num_scales)
        self.end_conv = nn.Conv2d(ngf, in_channels, 3, stride=1, padding=1)

        self.res1 = nn.ModuleList([block(ngf, ngf), block(ngf, ngf)])
        self.res2 = nn.ModuleList([block(ngf, wide, resample="down"), block(wide, wide)])
        self.res3 = nn.ModuleList(
            [block(wide, wide, resample="down", dilation=2), block(wide, wide, dilation=2)]
        )
        self.res4 = nn.ModuleList(
            [
                block(wide, wide, resample="down", dilation=4, adjust_padding=image_size == 28),
                block(wide, wide, dilation=4),
            ]
        )

        self.refine1 = CondRefineBlock([wide], wide, num_scales, norm, act, start=True)
        self.refine2 = CondRefineBlock([wide, wide], wide, num_scales, norm, act)
        self.refine3 = CondRefineBlock([wide, wide], ngf, num_scales, norm, act)
        self.refine4 = CondRefineBlock([ngf, ngf], ngf, num_scales, norm, act, end=True)

    @staticmethod
    def _run(stage: nn.ModuleList, h: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        for blk in stage:
            h = blk(h, levels)
        return h

    def forward(self, x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """Raw network output (= score estimate) for images ``x`` [B, C, H, W] at noise ``levels`` [B]."""
        h = 2.0 * x - 1.0 if self.rescale_input else x
        h = self.begin_conv(h)

        layer1 = self._run(self.res1, h, levels)
        layer2 = self._run(self.res2, layer1, levels)
        layer3 = self._run(self.res3, layer2, levels)
        layer4 = self._run(self.res4, layer3, levels)

        ref = self.refine1([layer4], levels, layer4.shape[2:])
        ref = self.refine2([layer3, ref], levels, layer3.shape[2:])
        ref = self.refine3([layer2, ref], levels, layer2.shape[2:])
        ref = self.refine4([layer1, ref], levels, layer1.shape[2:])

        out = self.act(self.normalizer(ref, levels))
        return self.end_conv(out)
