"""Reading checkpoints written by training, with one clear error line for every way a path can be wrong."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ncsn.errors import CheckpointError
from ncsn.lightning_private import monitor_candidates, save_last, save_top_k, should_skip_saving


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
    except Exception as exc:
        raise CheckpointError(f"could not read checkpoint '{p}' ({type(exc).__name__}); pick another .ckpt") from exc
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"'{p}' is not a Lightning checkpoint (no state_dict); pick a .ckpt written by train.py")
    if "ncsn_config" not in ckpt:
        raise CheckpointError(f"'{p}' has no ncsn_config; it was not written by ncsn's train.py")
    return ckpt


class AtomicCheckpointIO(TorchCheckpointIO):
    """A Lightning CheckpointIO that never leaves a truncated checkpoint behind.

    Each checkpoint is written to ``<name>.part`` in the same directory, flushed to disk, then renamed over
    the target with ``os.replace`` (atomic on POSIX). A process killed at any moment leaves either the
    previous complete file or the new complete file; at worst a stray ``.part`` that nothing reads.
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".part")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)



class FinalStepCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` whose last checkpoint also holds the final step.

    Lightning refreshes ``last.ckpt`` only at its periodic saves (and at the end only when nothing was saved at
    all), so a run that stops between two (``max_time``, ``max_steps`` not a multiple of
    ``every_n_train_steps``) would keep older weights there. At the end of training this saves it once more
    through ModelCheckpoint's own path (``lightning_private.save_last``), so ``last_model_path``, the loggers'
    ``after_save_checkpoint`` (W&B ``log_model``), ``save_weights_only`` and ``save_last="link"`` behave as at a
    periodic save; with ``link``, the final step is first saved as a regular (top-k) checkpoint for ``last`` to
    link to (with a ``monitor``, as at a periodic save, last links to the newest top-k file). It runs in the training processes (under ``ddp_spawn`` the launching process has neither the final
    step nor the callbacks' state) and, like every ModelCheckpoint, after the other callbacks' ``on_train_end``.
    """

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)  # Lightning's: saves last only when nothing was saved yet
        if not self.save_last or should_skip_saving(self, trainer):  # e.g. saved at this step already
            return
        candidates = monitor_candidates(self, trainer)
        if self.save_last == "link":
            save_top_k(self, trainer, candidates)  # the file that last.ckpt links to
        save_last(self, trainer, candidates)


def check_checkpoint_matches(model: torch.nn.Module, ckpt: dict[str, Any], path: str | Path) -> None:
    """Raise a CheckpointError when the loaded checkpoint ``ckpt`` (read from ``path``) does not fit ``model``
    (another model config)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in ckpt["state_dict"].items()}
    if expected == found:
        return
    missing = sorted(set(expected) - set(found))
    wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    detail = (f"{len(missing)} missing weights" if missing else "") + (
        f"{', ' if missing else ''}{wrong[0]} is {found[wrong[0]]} not {expected[wrong[0]]}" if wrong else "")
    raise CheckpointError(
        f"checkpoint '{path}' was trained with a different model config ({detail or 'other weights'}); "
        "use the same model/data/sigmas settings as its run (see its checkpoints/config.yaml)"
    )
