"""The one image-normalisation helper of the metrics: any image array -> float [N, C, H, W] in [0, 1].

Used by the digit classifier (``digits``), the sample-quality metrics and the FID feeders (``fid``), so every
metric reads samples files, uint8 arrays and model-range tensors the same way.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["image01", "inception_input"]


def image01(images: np.ndarray | torch.Tensor, *, channels: int | None = None) -> torch.Tensor:
    """float32 images [N, C, H, W] in [0, 1], on the input's device.

    Accepts uint8 in [0, 255] (divided by 255) or float (clamped to [0, 1]; NaN and -inf become 0, +inf 1, so a
    diverged sample scores as a blank or white image instead of NaN), laid out [N, C, H, W], [N, H, W, C]
    (``samples.npz``: C = 1 or 3 last) or [N, H, W] (grey). ``channels`` (1 or 3), when given, disambiguates a
    [N, C, H, W] / [N, H, W, C] array and is checked.
    """
    x = images if torch.is_tensor(images) else torch.as_tensor(np.asarray(images))
    shape = tuple(x.shape)
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        first_is_channels = x.shape[1] in (1, 3) if channels is None else x.shape[1] == channels
        last_is_channels = x.shape[-1] in (1, 3) if channels is None else x.shape[-1] == channels
        if last_is_channels and not first_is_channels:
            x = x.permute(0, 3, 1, 2)
    else:
        raise ValueError(f"expected images [N, H, W], [N, C, H, W] or [N, H, W, C], got an array of shape {shape}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"expected {channels}-channel images, got an array of shape {shape}")
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    return torch.nan_to_num(x.detach().float(), nan=0.0, posinf=1.0, neginf=0.0).clamp_(0.0, 1.0)


def inception_input(x01: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] [N, C, H, W] (C = 1 or 3) -> what the standard Inception takes: uint8 RGB, quantised with
    rounding (``round(255 x)``, like saving a PNG; torchmetrics' ``normalize=True`` truncates instead)."""
    if x01.shape[1] == 1:
        x01 = x01.expand(-1, 3, -1, -1)
    elif x01.shape[1] != 3:
        from ncsn.errors import ConfigError

        raise ConfigError(f"the Inception network takes 1- or 3-channel images, got {x01.shape[1]} channels")
    return (x01 * 255.0).round().to(torch.uint8)
