"""What moved where when the package was split into the core, ``ncsn.app`` and ``ncsn.tools``: THE one table.

Checkpoints and run directories written before the split name the old places: their stored run config
(``ncsn_config``) builds every object from a ``_target_`` such as ``ncsn.module.ScoreModel``, and users type
``python -m ncsn.convert``. Nothing else in the code knows the old names. Two things read this table:

* :func:`new_target` / :func:`upgrade_targets`: the one place an old ``_target_`` string becomes the new one;
  ``ncsn.app.checkpoints.read_torch_file`` (the one place a checkpoint is read: sample.py, resume, convert)
  runs every loaded checkpoint through :func:`upgrade_targets`, so the config it carries builds today's classes.
* :class:`OldCommandFinder`: ``python -m ncsn.convert`` / ``ncsn.report`` / ``ncsn.schedule_cli`` (the old
  spellings of the commands in ``ncsn.tools``) still run; ``import ncsn`` installs it. It answers only for
  :data:`OLD_COMMANDS`, and only by running the new module: no old module exists.

This module imports nothing but the standard library (``import ncsn`` runs it).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from collections.abc import Mapping
from typing import Any

#: old module -> new module (every name inside kept its name)
MOVED_MODULES: dict[str, str] = {
    "ncsn.app": "ncsn.app.common",
    "ncsn.training": "ncsn.app.train",
    "ncsn.sampling_app": "ncsn.app.sample",
    "ncsn.module": "ncsn.app.module",
    "ncsn.callbacks": "ncsn.app.callbacks",
    "ncsn.best_checkpoint": "ncsn.app.best_checkpoint",
    "ncsn.checkpoints": "ncsn.app.checkpoints",
    "ncsn.ema": "ncsn.app.ema",
    "ncsn.progress": "ncsn.app.progress",
    "ncsn.run_files": "ncsn.app.run_files",
    "ncsn.console": "ncsn.app.console",
    "ncsn.sweeps": "ncsn.app.sweeps",
    "ncsn.provenance": "ncsn.app.provenance",
    "ncsn.lightning_private": "ncsn.app.lightning_private",
    "ncsn.cpu_kernels": "ncsn.app.cpu_kernels",
    "ncsn.metrics.fid_callback": "ncsn.app.fid_callback",
    "ncsn.data.datamodules": "ncsn.app.datamodules",
    "ncsn.convert": "ncsn.tools.convert",
    "ncsn.official": "ncsn.tools.official",
    "ncsn.report": "ncsn.tools.report",
    "ncsn.report_jobs": "ncsn.tools.report_jobs",
    "ncsn.schedule_cli": "ncsn.tools.sigma_helper",
    "ncsn.metrics.score": "ncsn.tools.score",
}

#: old ``module.name`` -> new, for names a package re-exported from a module that moved
MOVED_NAMES: dict[str, str] = {
    "ncsn.data.ImageDataModule": "ncsn.app.datamodules.ImageDataModule",
    "ncsn.data.ToyDataModule": "ncsn.app.datamodules.ToyDataModule",
    "ncsn.data.per_device_batch_size": "ncsn.app.datamodules.per_device_batch_size",
    "ncsn.metrics.FIDCallback": "ncsn.app.fid_callback.FIDCallback",
    "ncsn.metrics.quality_metric_for_data": "ncsn.app.datamodules.quality_metric_for_data",
}

#: the old ``python -m`` spellings of the commands, still run (the new ones, ``python -m ncsn.tools.<name>``, are
#: what the README shows)
OLD_COMMANDS: dict[str, str] = {
    old: MOVED_MODULES[old] for old in ("ncsn.convert", "ncsn.report", "ncsn.schedule_cli")
}


def new_target(target: str) -> str:
    """Today's dotted path of ``target`` (a ``_target_`` of a config written by an earlier release): a moved
    name, else the same name in its moved module, else ``target`` itself."""
    if target in MOVED_NAMES:
        return MOVED_NAMES[target]
    module, _, name = target.rpartition(".")
    if module in MOVED_MODULES:
        return f"{MOVED_MODULES[module]}.{name}"
    return target


def upgrade_targets(obj: Any) -> Any:
    """``obj`` (a loaded checkpoint, a config as plain containers) with every ``_target_`` string updated in
    place by :func:`new_target`; returns ``obj``."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key == "_target_" and isinstance(value, str):
                obj[key] = new_target(value)
            else:
                upgrade_targets(value)
    elif isinstance(obj, list):
        for value in obj:
            upgrade_targets(value)
    return obj


class OldCommandFinder(importlib.abc.MetaPathFinder):
    """Finds an old command spelling (``python -m ncsn.convert``) as the new module's file, so ``runpy`` runs the
    new module as ``__main__``. Importing an old name is refused as before: no module answers to it."""

    def __init__(self, commands: Mapping[str, str]) -> None:
        self.commands = dict(commands)

    def find_spec(self, fullname, path=None, target=None):
        new = self.commands.get(fullname)
        if new is None or not _running_as_main():
            return None
        spec = importlib.util.find_spec(new)
        return importlib.util.spec_from_file_location(fullname, spec.origin) if spec and spec.origin else None


def _running_as_main() -> bool:
    """Whether ``python -m`` is looking for the module to run (``sys.argv[0]`` is ``-m`` until runpy has found
    it), not an ``import`` statement."""
    return sys.argv[:1] == ["-m"]


def install() -> None:
    """Put :class:`OldCommandFinder` on ``sys.meta_path`` once."""
    if not any(isinstance(f, OldCommandFinder) for f in sys.meta_path):
        sys.meta_path.append(OldCommandFinder(OLD_COMMANDS))
