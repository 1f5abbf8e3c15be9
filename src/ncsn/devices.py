"""Which torch device to run on: the one rule that sample.py, the metrics and the scoring CLI share."""

from __future__ import annotations

import torch

from ncsn.errors import ConfigError


def pick_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or None): the GPU when one is visible, else the CPU; ``gpu`` is ``cuda`` (as Lightning's
    ``accelerator=gpu``); any other name is that torch device. An unknown name, or a CUDA device asked for when no
    GPU is visible, is a :class:`ConfigError` (one line), not a crash later on."""
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    asked = str(name)
    try:
        device = torch.device("cuda" + asked[3:] if asked.split(":")[0] == "gpu" else name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {asked!r}; use device=auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={asked} asked for but no CUDA GPU is visible; use device=cpu or device=auto")
    return device
