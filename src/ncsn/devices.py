"""Which torch device to run on: the one rule that sample.py, the metrics and the scoring CLI share."""

from __future__ import annotations

import torch

from ncsn.errors import ConfigError


def pick_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or None): the GPU when one is visible, else the CPU; any other name is that device. A CUDA
    device asked for when no GPU is visible is a :class:`ConfigError` (one line), not a crash later on."""
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} asked for but no CUDA GPU is visible; use device=cpu or device=auto")
    return device
