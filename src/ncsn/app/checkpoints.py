"""Reading checkpoints written by training, with one clear error line for every way a path can be wrong.

Every checkpoint file a user names (sample.py, train.py's ``ckpt_path=`` / ``auto_resume=true`` and Lightning's
own resume load, ``python -m ncsn.tools.convert``, the bench scripts) is unpickled by :func:`read_torch_file` alone,
with ``weights_only=True``: a file that would need any other Python object is refused before anything of it
runs, unless the user says they trust it (``trust_checkpoint=true``).
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ncsn.app.lightning_private import monitor_candidates, save_last, save_top_k, should_skip_saving
from ncsn.errors import CheckpointError, ConfigError
from ncsn.moved import upgrade_targets

log = logging.getLogger("ncsn")

# The non-tensor types our own checkpoints need beyond torch's default weights-only allowlist (tensors, dicts,
# OrderedDict, lists, tuples, str, numbers, bool, None). None today: every entry train.py and ncsn.tools.convert write
# is one of those (RngStateCallback stores numpy's state as a tensor and numbers, ncsn_config is a plain
# container, the datamodule's hyperparameters are numbers and strings), checked on checkpoints of experiment=
# mnist_paper (EMA on), cpu, quick and toy_gmm and on the release before safe loading
# (tests/test_safe_loading.py loads them). Add a type here only when a checkpoint of ours holds one: it lets
# ANY file build that type during loading.
OUR_SAFE_GLOBALS: list = []
torch.serialization.add_safe_globals(OUR_SAFE_GLOBALS)

TRUST_SETTING = "trust_checkpoint=true"
_GLOBAL_IN_MESSAGE = re.compile(r"GLOBAL ([\w.]+)")
_warned_trusted: set[str] = set()


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that holds objects whose unpickling could run code (refused unless trusted)."""


def trust_flag(value: Any) -> bool:
    """The ``trust_checkpoint`` setting as a bool (``true``/``false``, any case); anything else is a ConfigError."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ConfigError(f"trust_checkpoint must be true or false (got {value!r})")


def _first_unsafe_global(path: Path, exc: Exception) -> str | None:
    """The first global the weights-only unpickler refused in ``path``: from its message, else the first of torch's
    static scan of the pickle; None when neither names one."""
    found = _GLOBAL_IN_MESSAGE.search(str(exc))
    if found:
        name = found.group(1)
        return name if "." in name else f"builtins.{name}"  # torch drops the module of builtins (getattr, eval)
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - not a zip checkpoint: nothing more to learn here
        return None
    return names[0] if names else None


def _unpickler_reason(exc: Exception) -> str:
    """The weights-only unpickler's own reason in torch's long message (e.g. ``Unsupported operand 149``)."""
    text = str(exc).split("WeightsUnpickler error:", 1)[-1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("Check the doc")]
    return lines[0] if lines else type(exc).__name__


def read_torch_file(path: str | Path, *, trust: bool = False, mmap: bool = False) -> Any:
    """Unpickle a file written by ``torch.save`` onto the CPU: THE one place a checkpoint is read.

    With ``weights_only=True`` (torch's restricted unpickler: tensors, containers, numbers, strings and
    :data:`OUR_SAFE_GLOBALS`); a file that needs any other global raises :class:`UnsafeCheckpointError` naming
    the first one, and nothing of it has run. ``trust=True`` (the user's ``trust_checkpoint=true``) logs a
    warning once per file and unpickles everything. Other read errors propagate as torch raises them.

    The ``_target_`` names that a checkpoint of an earlier release stores come back as today's (the LightningModule
    as ``ncsn.app.module.ScoreModel``): :func:`ncsn.moved.upgrade_targets`.
    """
    p = Path(path)
    if trust:
        if str(p.absolute()) not in _warned_trusted:
            _warned_trusted.add(str(p.absolute()))
            log.warning("trust_checkpoint=true: loading '%s' with full unpickling, which runs any code the file "
                        "holds; use it only for files from a source you trust", p)
        return upgrade_targets(torch.load(p, map_location="cpu", weights_only=False, mmap=mmap))
    try:
        return upgrade_targets(torch.load(p, map_location="cpu", weights_only=True, mmap=mmap))
    except pickle.UnpicklingError as exc:
        name = _first_unsafe_global(p, exc)
        if name is None and not zipfile.is_zipfile(p):  # e.g. a text file read as a legacy torch file
            raise
        what = (f"holds objects that would run code when loaded (first: {name})" if name else
                f"holds pickle data the safe loader refuses ({_unpickler_reason(exc)})")
        raise UnsafeCheckpointError(
            f"checkpoint '{p}' {what}, so it was not loaded; if you trust the file and where it came from, "
            f"add {TRUST_SETTING}"
        ) from None


def refuse_unsafe_checkpoint(path: str | Path) -> None:
    """Raise :class:`UnsafeCheckpointError` when ``path`` would need more than the weights-only unpickler allows.

    For the entry points' check before anything is written; the tensors are memory-mapped, not read. Any other
    problem (missing, truncated, not a checkpoint) is left to :func:`load_checkpoint`'s own error line."""
    try:
        read_torch_file(path, mmap=True)
    except UnsafeCheckpointError:
        raise
    except Exception:  # noqa: BLE001 - reported by the loader the task runs
        return


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


def load_checkpoint(path: str | Path, *, trust: bool = False) -> dict[str, Any]:
    """Load a Lightning checkpoint on the CPU (:func:`read_torch_file`; ``trust``: the user's
    ``trust_checkpoint``); it must carry the run config (``ncsn_config``)."""
    p = check_checkpoint_path(path)
    try:
        ckpt = read_torch_file(p, trust=trust)
    except UnsafeCheckpointError:
        raise
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

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        """Lightning's resume load (``Trainer.fit(ckpt_path=..., weights_only=...)``) through
        :func:`read_torch_file`: trusted only when told ``weights_only=False`` (``trust_checkpoint=true``)."""
        return read_torch_file(path, trust=weights_only is False)



class FinalStepCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` whose last checkpoint also holds the final step.

    Lightning refreshes ``last.ckpt`` only at its periodic saves (and at the end only when nothing was saved at
    all), so a run that stops between two (``max_time``, ``max_steps`` not a multiple of
    ``every_n_train_steps``) would keep older weights there. At the end of training this saves it once more
    through ModelCheckpoint's own path (``lightning_private.save_last``), so ``last_model_path``, the loggers'
    ``after_save_checkpoint`` (W&B ``log_model``), ``save_weights_only`` and ``save_last="link"`` behave as at a
    periodic save; with ``link``, the final step is first saved as a regular (top-k) checkpoint for ``last`` to
    link to (with a ``monitor``, as at a periodic save, last links to the newest top-k file).
    It runs in the training processes (under ``ddp_spawn`` the launching process has neither the final
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
