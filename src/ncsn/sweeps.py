"""Sweep plumbing (placeholder until the sweep work lands): W&B group and tags of multirun jobs."""

from __future__ import annotations

from omegaconf import DictConfig


def apply_sweep_metadata(cfg: DictConfig) -> None:
    """In a Hydra multirun, put the job's W&B run in the sweep's group and tag it with the swept values."""
    return None
