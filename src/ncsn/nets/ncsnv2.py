"""NCSNv2 score networks (Song & Ermon 2020, "Improved Techniques for Training Score-Based
Generative Models"): ``NCSNv2`` (CIFAR-10, CelebA 64), ``NCSNv2Deeper`` (LSUN at 128-256 px) and
``NCSNv2Deepest`` (FFHQ 256 px), as ermongroup/ncsnv2 ``models/ncsnv2.py`` builds them.

Same encoder/decoder layout as :class:`ncsn.nets.refinenet.NCSN`, but *unconditional*:
normalisation is the per-channel :class:`InstanceNorm2dPlus`, the RCU/CRP/MSF blocks have no
normalisation at all, and CRP uses max pooling. The noise level enters only through the
parameterisation s(x, sigma) = net(x) / sigma (technique 3 of the paper). That division is
done by :func:`ncsn.nets.score_function`, not here, so ``forward`` returns the raw output and
ignores ``levels``.

The three networks differ only in their encoder stages (:data:`NCSNV2_STAGES` and friends): each
stage is two residual blocks, and the decoder has one RefineNet block per stage, deepest first,
fusing the stage's output with the coarser decoder output and returning the stage's input width.
Module names (``res31``, ``refine31`` ...) are the official ones, so their checkpoints load as is.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ncsn.errors import ConfigError
from ncsn.nets.layers import ConditionalResidualBlock, ResidualBlock, check_sizes
from ncsn.nets.normalization import InstanceNorm2dPlus, SigmaEmbedding, SigmaInstanceNorm2dPlus
from ncsn.nets.refine_blocks import RefineBlock

#: the parameterisations of the network's output (``precondition``)
PRECONDITIONS = ("none", "edm")


class Stage(NamedTuple):
    """One encoder stage (two residual blocks) and its decoder block.

    ``cin``/``cout`` are multiples of ``ngf``. ``down``: the first block is built with
    ``resample='down'`` (halves H and W unless ``dilation`` is set, see
    :func:`ncsn.nets.layers._residual_convs`). ``dilation``: of every conv in the stage.
    """

    name: str
    refine: str
    cin: int
    cout: int
    down: bool = True
    dilation: int | None = None


#: ``NCSNv2`` (32-64 px): one halving (res2); res3 and res4 are "down" blocks that dilate instead
NCSNV2_STAGES = (
    Stage("res1", "refine4", 1, 1, down=False),
    Stage("res2", "refine3", 1, 2),
    Stage("res3", "refine2", 2, 2, dilation=2),
    Stage("res4", "refine1", 2, 2, dilation=4),
)
#: ``NCSNv2Deeper`` (LSUN): two real halvings, then two dilated stages at 4 ngf
NCSNV2_DEEPER_STAGES = (
    Stage("res1", "refine5", 1, 1, down=False),
    Stage("res2", "refine4", 1, 2),
    Stage("res3", "refine3", 2, 2),
    Stage("res4", "refine2", 2, 4, dilation=2),
    Stage("res5", "refine1", 4, 4, dilation=4),
)
#: ``NCSNv2Deepest`` (FFHQ): one more real halving (``res31``) than ``NCSNv2Deeper``
NCSNV2_DEEPEST_STAGES = (
    Stage("res1", "refine5", 1, 1, down=False),
    Stage("res2", "refine4", 1, 2),
    Stage("res3", "refine3", 2, 2),
    Stage("res31", "refine31", 2, 2),
    Stage("res4", "refine2", 2, 4, dilation=2),
    Stage("res5", "refine1", 4, 4, dilation=4),
)


class NCSNv2(nn.Module):
    """Unconditional dilated RefineNet of NCSNv2 (the CIFAR-10 / CelebA ``NCSNv2`` model).

    Args:
        in_channels: image channels.
        image_size: image side length, a multiple of 2 per halving stage. (The official NCSNv2
            sets ``adjust_padding`` in ``res4`` at 28 px; that block is dilated, where it has no
            effect, so it is not passed here.)
        ngf: base number of feature maps.
        num_scales: accepted so NCSN and NCSNv2 share config keys; unused.
        rescale_input: map inputs from [0, 1] to [-1, 1] with ``2x - 1`` before the first conv.
        sigma_embedding: tell the network σ (not in the official NCSNv2): a continuous embedding of log σ
            (:class:`SigmaEmbedding`, width 4·ngf) conditions every residual block's InstanceNorm++ and the
            final one (:class:`SigmaInstanceNorm2dPlus`); ``forward(x, sigma)`` then takes σ values and
            ``noise_input`` is ``"sigma"``. The score stays net(x, σ)/σ. Off: exactly the official network.
        precondition: ``"none"`` (the paper: the body's output is σ·s) or ``"edm"`` (Karras et al. 2022's
            preconditioning, needs ``sigma_embedding``): the denoiser is D = c_skip·y + c_out·F(c_in·y, σ) on the
            centred data y (x − 0.5 with ``rescale_input``, else x), c_skip = σ_d²/(σ² + σ_d²),
            c_out = σσ_d/√(σ² + σ_d²), c_in = 1/√(σ² + σ_d²); ``forward`` still returns σ·s = (D − x)/σ, so the
            score, the samplers and the loss are unchanged (the module gives the loss EDM's weight).
        sigma_data: σ_d, the RMS of the centred data (0.5: images in [0, 1] centred at 0.5, as EDM's 0.5 for [-1, 1]
            has it relative to the data's spread).
    """

    divide_by_sigma = True
    noise_input = "none"  # σ enters only through the division: evaluated at any σ exactly
    stages: tuple[Stage, ...] = NCSNV2_STAGES

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 32,
        ngf: int = 128,
        num_scales: int | None = None,
        rescale_input: bool = True,
        sigma_embedding: bool = False,
        precondition: str = "none",
        sigma_data: float = 0.5,
    ) -> None:
        super().__init__()
        check_sizes(in_channels=in_channels, image_size=image_size, ngf=ngf)
        if precondition not in PRECONDITIONS:
            choices = ", ".join(PRECONDITIONS)
            raise ConfigError(f"unknown model.net.precondition '{precondition}'; choose one of {choices}")
        if precondition == "edm" and not sigma_embedding:
            raise ConfigError("model.net.precondition=edm needs model.net.sigma_embedding=true (its input scaling c_in "
                              "hides σ from a network that has to infer it)")
        if not float(sigma_data) > 0:
            raise ConfigError(f"model.net.sigma_data must be > 0 (got {sigma_data})")
        self.precondition = precondition
        self.sigma_data = float(sigma_data)
        self.in_channels = in_channels
        self.image_size = image_size
        self.ngf = ngf
        self.num_scales = num_scales
        self.rescale_input = rescale_input

        act = nn.ELU()
        self.act = act
        self.sigma_embedding = bool(sigma_embedding)
        if self.sigma_embedding:
            self.noise_input = "sigma"
            width = 4 * ngf
            self.sigma_embed = SigmaEmbedding(width)

            def block(cin: int, cout: int, **kwargs) -> nn.Module:
                return ConditionalResidualBlock(cin, cout, width, SigmaInstanceNorm2dPlus, act=act, **kwargs)
        else:
            def block(cin: int, cout: int, **kwargs) -> nn.Module:
                return ResidualBlock(cin, cout, InstanceNorm2dPlus, act=act, **kwargs)

        self.begin_conv = nn.Conv2d(in_channels, ngf, 3, stride=1, padding=1)
        self.normalizer = (SigmaInstanceNorm2dPlus(ngf, width) if self.sigma_embedding
                           else InstanceNorm2dPlus(ngf, bias=True))
        self.end_conv = nn.Conv2d(ngf, in_channels, 3, stride=1, padding=1)

        for s in self.stages:
            cin, cout = s.cin * ngf, s.cout * ngf
            first = block(cin, cout, resample="down" if s.down else None, dilation=s.dilation)
            self.add_module(s.name, nn.ModuleList([first, block(cout, cout, dilation=s.dilation)]))
        # decoder blocks, registered in name order as the official classes do (refine3 before refine31),
        # which is the parameter order of their state dicts and optimizer states
        deepest = self.stages[-1]
        for s in sorted(self.stages, key=lambda st: st.refine):
            inputs = [s.cout * ngf] if s is deepest else [s.cout * ngf, s.cout * ngf]
            block = RefineBlock(inputs, s.cin * ngf, act, start=s is deepest, end=s is self.stages[0])
            self.add_module(s.refine, block)

    def forward(self, x: torch.Tensor, levels: torch.Tensor | None = None) -> torch.Tensor:
        """Raw output for images ``x`` [B, C, H, W]; ``levels`` is accepted and ignored (with
        ``sigma_embedding``: the σ values [B] the network is conditioned on).

        Divide by sigma (see :func:`ncsn.nets.score_function`) to get the score.
        """
        if self.precondition == "edm":
            return self._preconditioned(x, levels)
        return self._body(2.0 * x - 1.0 if self.rescale_input else x, levels)

    @property
    def edm_preconditioning(self) -> tuple[float, float] | None:
        """(σ_d, centre) of EDM's preconditioning (the data are centred at 0.5 with ``rescale_input``, else at 0),
        None without it: what the loss needs for EDM's weight (``ncsn.losses.dsm_loss(precondition=)``)."""
        if self.precondition != "edm":
            return None
        return self.sigma_data, (0.5 if self.rescale_input else 0.0)

    def _preconditioned(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """σ·s = (D − x)/σ with EDM's D = c_skip·y + c_out·F(c_in·y) on the centred data y (see the class)."""
        sigma_data, centre = self.edm_preconditioning
        s = sigma.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        y = x - centre
        var = s.square() + sigma_data**2
        body = self._body(y * var.rsqrt(), sigma)
        # (c_skip − 1)·y/σ + c_out/σ · F
        return -s * y / var + sigma_data * var.rsqrt() * body

    def _body(self, h: torch.Tensor, levels: torch.Tensor | None) -> torch.Tensor:
        emb = self.sigma_embed(levels) if self.sigma_embedding else None
        h = self.begin_conv(h)

        skips = []
        for s in self.stages:
            for blk in getattr(self, s.name):
                h = blk(h) if emb is None else blk(h, emb)
            skips.append(h)

        ref = None
        for s, skip in zip(reversed(self.stages), reversed(skips), strict=True):
            inputs = [skip] if ref is None else [skip, ref]
            ref = getattr(self, s.refine)(inputs, skip.shape[2:])

        out = self.act(self.normalizer(ref) if emb is None else self.normalizer(ref, emb))
        return self.end_conv(out)


class NCSNv2Deeper(NCSNv2):
    """ermongroup/ncsnv2's ``NCSNv2Deeper`` (the LSUN church / bedroom / tower model): a fifth encoder
    stage, widths up to 4 ngf, features at 1/4 of the image size in the three deepest stages."""

    stages = NCSNV2_DEEPER_STAGES


class NCSNv2Deepest(NCSNv2):
    """ermongroup/ncsnv2's ``NCSNv2Deepest`` (the FFHQ model): ``NCSNv2Deeper`` with one more halving
    stage (``res31`` / ``refine31``), so the deepest features are at 1/8 of the image size."""

    stages = NCSNV2_DEEPEST_STAGES
