"""Reading checkpoints written by training, with one clear error line for every way a path can be wrong."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch

from ncsn.errors import CheckpointError


def check_checkpoint_path(path: str | Path) -> Path:
    """Cheap checks before loading: the path exists, is a file, and is a complete torch zip archive."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint '{p}' does not exist; pass ckpt_path=<run dir>/checkpoints/last.ckpt")
    if p.is_dir():
        raise CheckpointError(f"checkpoint '{p}' is a directory; pass the .ckpt file inside it (e.g. last.ckpt)")
    if not zipfile.is_zipfile(p):
        raise CheckpointError(
            f"'{p}' is not a readable checkpoint (truncated or not written by torch.save); pick another .ckpt"
        )
    return p


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a Lightning checkpoint on the CPU; it must carry the run config (``ncsn_config``)."""
    p = check_checkpoint_path(path)
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise CheckpointError(f"could not read checkpoint '{p}' ({type(exc).__name__}); pick another .ckpt") from exc
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"'{p}' is not a Lightning checkpoint (no state_dict); pick a .ckpt written by train.py")
    if "ncsn_config" not in ckpt:
        raise CheckpointError(f"'{p}' has no ncsn_config; it was not written by ncsn's train.py")
    return ckpt
