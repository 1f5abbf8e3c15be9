"""NCSNv2 score network (Song & Ermon 2020, "Improved Techniques for Training Score-Based
Generative Models").

Same encoder/decoder layout as :class:`ncsn.nets.refinenet.NCSN`, but *unconditional*:
normalisation is the per-channel :class:`InstanceNorm2dPlus`, the RCU/CRP/MSF blocks have no
normalisation at all, and CRP uses max pooling. The noise level enters only through the
parameterisation s(x, sigma) = net(x) / sigma (technique 3 of the paper). That division is
done by :func:`ncsn.nets.score_function`, not here, so :meth:`NCSNv2.forward` returns the raw
output and ignores ``levels``.
"""

from __future__ import annotations

import torch
from torch import nn

from ncsn.nets.layers import RefineBlock, ResidualBlock, check_sizes
from ncsn.nets.normalization import InstanceNorm2dPlus


class NCSNv2(nn.Module):
    """Unconditional dilated RefineNet of NCSNv2 (the CIFAR-10 ``NCSNv2`` model).

    Args:
        in_channels: image channels.
        image_size: image side length (28 sets ``adjust_padding`` in ``res4``, a no-op since
            that block is dilated; kept for fidelity). Must be even.
        ngf: base number of feature maps.
        num_scales: accepted so NCSN and NCSNv2 share config keys; unused.
        rescale_input: map inputs from [0, 1] to [-1, 1] with ``2x - 1`` before the first conv.
    """

    divide_by_sigma = True

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 32,
        ngf: int = 128,
        num_scales: int | None = None,
        rescale_input: bool = True,
    ) -> None:
        super().__init__()
        check_sizes(in_channels=in_channels, image_size=image_size, ngf=ngf)
        self.in_channels = in_channels
        self.image_size = image_size
        self.ngf = ngf
        self.num_scales = num_scales
        self.rescale_input = rescale_input

        norm = InstanceNorm2dPlus
        act = nn.ELU()
        self.act = act
        wide = 2 * ngf

        def block(cin: int, cout: int, **kwargs) -> ResidualBlock:
            return ResidualBlock(cin, cout, norm, act=act, **kwargs)

        self.begin_conv = nn.Conv2d(in_channels, ngf, 3, stride=1, padding=1)
        self.normalizer = norm(ngf, bias=True)
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

        self.refine1 = RefineBlock([wide], wide, act, start=True)
        self.refine2 = RefineBlock([wide, wide], wide, act)
        self.refine3 = RefineBlock([wide, wide], ngf, act)
        self.refine4 = RefineBlock([ngf, ngf], ngf, act, end=True)

    @staticmethod
    def _run(stage: nn.ModuleList, h: torch.Tensor) -> torch.Tensor:
        for blk in stage:
            h = blk(h)
        return h

    def forward(self, x: torch.Tensor, levels: torch.Tensor | None = None) -> torch.Tensor:
        """Raw output for images ``x`` [B, C, H, W]; ``levels`` is accepted and ignored.

        Divide by sigma (see :func:`ncsn.nets.score_function`) to get the score.
        """
        h = 2.0 * x - 1.0 if self.rescale_input else x
        h = self.begin_conv(h)

        layer1 = self._run(self.res1, h)
        layer2 = self._run(self.res2, layer1)
        layer3 = self._run(self.res3, layer2)
        layer4 = self._run(self.res4, layer3)

        ref = self.refine1([layer4], layer4.shape[2:])
        ref = self.refine2([layer3, ref], layer3.shape[2:])
        ref = self.refine3([layer2, ref], layer2.shape[2:])
        ref = self.refine4([layer1, ref], layer1.shape[2:])

        out = self.act(self.normalizer(ref))
        return self.end_conv(out)
