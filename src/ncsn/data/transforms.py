"""Image value ranges and the image transform pipeline: every value-range convention lives here.

Convention (as in the paper and the official code): **the model range is [0, 1]**. Images from the data
are 8-bit pixels ``k`` in {0..255}; ``ToTensor`` maps them to ``k / 255`` and ``Dequantize`` to
``k / 256 + U[0, 1/256)``, i.e. into [0, 1). The score networks rescale their input internally, samplers
start from and return tensors in this range, and nothing else in the project rescales images.

* ``to_model_range``: [0, 1] tensor -> model range (the identity under this convention).
* ``to_image_range``: model-range tensor -> [0, 1] image, clamped (for grids / ``save_image``).
* ``to_uint8``: model-range [N, C, H, W] (or [C, H, W]) -> uint8 [N, H, W, C] (or [H, W, C]); it is the
  exact inverse of ``Dequantize`` (``floor(256 x)``), and also inverts ``ToTensor``'s ``k / 255``.
"""

from __future__ import annotations

import torch
from torchvision import transforms as T

MODEL_RANGE = (0.0, 1.0)


def to_model_range(x01: torch.Tensor) -> torch.Tensor:
    """A tensor in [0, 1] → the model's range (identity: the model range is [0, 1])."""
    return x01


def to_image_range(x_model: torch.Tensor) -> torch.Tensor:
    """A model-range tensor → an image in [0, 1] (clamped: samples can overshoot)."""
    return x_model.clamp(0.0, 1.0)


def to_uint8(x_model: torch.Tensor) -> torch.Tensor:
    """Model-range images [N, C, H, W] (or [C, H, W]) → uint8 [N, H, W, C] (or [H, W, C]), on the CPU.

    Pixel ``k`` covers [k/256, (k+1)/256) after ``Dequantize``, so ``floor(256 x)`` (clipped to 255) recovers
    it exactly; it also maps ``ToTensor``'s ``k / 255`` back to ``k``.
    """
    x = to_image_range(x_model.detach().float().cpu())
    return (x * 256.0).floor().clamp(0, 255).to(torch.uint8).movedim(-3, -1).contiguous()


class Dequantize(torch.nn.Module):
    """Uniform dequantisation of a float tensor in [0, 1] that came from 8-bit pixels.

    ``x * 255/256 + U[0, 1/256)`` (official code: ``X / 256. * 255. + torch.rand_like(X) / 256.``): pixel ``k``
    becomes uniform on [k/256, (k+1)/256), so the data has a density and stays in [0, 1).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / 256.0 * 255.0 + torch.rand_like(x) / 256.0


class ToModelRange(torch.nn.Module):
    """``to_model_range`` as a transform (last step of ``image_transform``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return to_model_range(x)


def image_transform(image_size: int, train: bool, random_flip: bool, center_crop: int | None = None, *,
                    native_size: int | None = None, dequantize: bool = True) -> T.Compose:
    """The PIL image → model-range tensor pipeline.

    ``CenterCrop(center_crop)`` (if given), then ``Resize(image_size)`` + ``CenterCrop(image_size)`` unless the
    images are already ``image_size`` square (``native_size``: the square side of the raw images, when known),
    ``RandomHorizontalFlip`` when ``train and random_flip``, ``ToTensor``, ``Dequantize``, ``ToModelRange``.
    """
    steps: list = []
    if center_crop:
        steps.append(T.CenterCrop(center_crop))
    current = center_crop or native_size
    if current != image_size:
        # Resize scales the short edge; the CenterCrop makes non-square inputs square (a no-op otherwise).
        steps += [T.Resize(image_size, antialias=True), T.CenterCrop(image_size)]
    if train and random_flip:
        steps.append(T.RandomHorizontalFlip())
    steps.append(T.ToTensor())
    if dequantize:
        steps.append(Dequantize())
    steps.append(ToModelRange())
    return T.Compose(steps)
