"""Sweep plumbing: which overrides a multirun job sweeps, and its W&B group, tags and run name.

``apply_sweep_metadata(cfg)`` is called by ``ncsn.app.train.train`` right after seeding. In a Hydra multirun
(``python train.py -m ...``) with a ``logger.wandb`` entry it puts the job's W&B run

* in the sweep's group (``logger.wandb.group`` = the sweep dir's basename, unless the user set a group),
* tagged with the job's swept values (``sigmas.sigma_max=10``, ...),
* under a name that ends with the job number (``toy_gmm-3``),

so the runs of one sweep can be filtered and compared in W&B. The hyperparameters themselves are logged as
config by ``train()``. Outside a multirun, or without W&B, it does nothing.

"Swept" overrides are the ones that vary between the jobs of a sweep: the keys given as sweeps on the
command line (``a=1,2``, ``range(...)``, ``choice(...)``; read from the sweep dir's ``multirun.yaml``) and
the keys of ``hydra.sweeper.params`` (Optuna, or the basic sweeper's ``params``). When neither can be read
every override of the job counts as swept. ``ncsn.tools.report`` uses the same helpers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger("ncsn")

WANDB_TAG_MAX_CHARS = 64  # W&B rejects longer tags


def _parse(overrides: Iterable[str]) -> list[Any] | None:
    """Hydra ``Override`` objects for ``overrides`` (None if any of them does not parse)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_overrides([str(o) for o in overrides])
    except Exception:  # noqa: BLE001 - unparsable input: callers fall back to the raw strings
        return None


def override_items(overrides: Iterable[str]) -> list[tuple[str, str]]:
    """``(key, value)`` pairs of command-line overrides, without ``+``/``++``/``~`` prefixes.

    ``['sigmas.sigma_max=10', '+callbacks.x=2', 'trainer=ddp']`` →
    ``[('sigmas.sigma_max', '10'), ('callbacks.x', '2'), ('trainer', 'ddp')]``.
    """
    overrides = [str(o) for o in overrides]
    parsed = _parse(overrides)
    if parsed is None:
        items = []
        for raw in overrides:
            key, _, value = raw.partition("=")
            items.append((key.lstrip("+~"), value))
        return items
    items = []
    for raw, o in zip(overrides, parsed, strict=True):
        key = o.key_or_group if o.package is None else f"{o.key_or_group}@{o.package}"
        value = raw.partition("=")[2] if "=" in raw else ""
        items.append((key, value))
    return items


def sweep_keys(sweep_overrides: Iterable[str] = (), sweeper_params: Mapping | None = None) -> set[str]:
    """Keys a sweep varies: sweep-valued command-line overrides (``a=1,2``) and ``hydra.sweeper.params`` keys,
    without ``+``/``++``/``~`` prefixes (as ``override_items`` gives the jobs' keys)."""
    keys: set[str] = {str(k).lstrip("+~") for k in (sweeper_params or {})}
    parsed = _parse(sweep_overrides)
    if parsed is not None:
        for o in parsed:
            if o.is_sweep_override():
                keys.add(o.key_or_group if o.package is None else f"{o.key_or_group}@{o.package}")
    return keys


def read_sweep_overrides(sweep_dir: str | Path) -> list[str]:
    """The command-line overrides of a sweep, sweeps included (``<sweep dir>/multirun.yaml``; [] if absent)."""
    path = Path(sweep_dir) / "multirun.yaml"
    try:
        cfg = OmegaConf.load(path)
        task = OmegaConf.select(cfg, "hydra.overrides.task", default=None)
    except Exception:  # noqa: BLE001 - a missing or unreadable file just means "unknown"
        return []
    return [str(t) for t in task] if task is not None else []


def swept_items(job_overrides: Iterable[str], sweep_overrides: Iterable[str] = (),
                sweeper_params: Mapping | None = None) -> list[tuple[str, str]]:
    """The ``(key, value)`` pairs of a job's overrides that its sweep varies (all of them if unknown)."""
    items = override_items(job_overrides)
    keys = sweep_keys(sweep_overrides, sweeper_params)
    if not keys:
        return items
    return [(k, v) for k, v in items if k in keys]


def _tag(key: str, value: str) -> str:
    tag = f"{key}={value}"
    return tag if len(tag) <= WANDB_TAG_MAX_CHARS else tag[: WANDB_TAG_MAX_CHARS - 1] + "…"


def apply_sweep_metadata(cfg: DictConfig) -> None:
    """In a Hydra multirun, put the job's W&B run in the sweep's group, tag it with the swept values and
    add the job number to its name. No-op outside a multirun or without ``logger.wandb``."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return
    wandb_cfg = OmegaConf.select(cfg, "logger.wandb", default=None)
    if not isinstance(wandb_cfg, DictConfig):
        return

    sweep_dir = Path(str(hc.sweep.dir))
    sweeper_params = OmegaConf.select(hc, "sweeper.params", default=None)
    if sweeper_params is not None:
        sweeper_params = OmegaConf.to_container(sweeper_params)
    swept = swept_items(hc.overrides.task, read_sweep_overrides(sweep_dir), sweeper_params)
    job_num = hc.job.get("num")

    group = wandb_cfg.get("group")
    tags = wandb_cfg.get("tags")
    name = wandb_cfg.get("name")
    tags = [str(t) for t in (OmegaConf.to_container(tags) if OmegaConf.is_config(tags) else tags or [])]
    for key, value in swept:
        tag = _tag(key, value)
        if tag not in tags:
            tags.append(tag)
    base = str(name) if name else sweep_dir.name
    with open_dict(cfg):
        cfg.logger.wandb.group = str(group) if group else sweep_dir.name
        cfg.logger.wandb.tags = tags
        cfg.logger.wandb.name = base if job_num is None else f"{base}-{job_num}"
    log.info("W&B: group %s, run %s, tags %s", cfg.logger.wandb.group, cfg.logger.wandb.name, tags)


# ------------------------------------------------------------------------------------------------ optimized_metric
OPTIMIZED_METRIC_FILE = "optimized_metric.txt"


def run_quality_key(cfg: DictConfig) -> str | None:
    """The primary sample-quality key a training config will log (``ncsn.metrics.registry``), or None when its
    sample grid or quality pass is off or its data has no metric. Decided from the config alone, from what the
    sample grid itself reads (its data and its own ``inception_weights``, which is ``paths.inception_weights``
    unless set directly): the ONE source of the key for ``optimized_metric=auto`` and the best checkpoint's
    ``monitor: auto``."""
    from ncsn.metrics.registry import primary_quality_key

    grid = OmegaConf.select(cfg, "callbacks.sample_grid", default=None)
    if not grid or not grid.get("quality", True) or "data" not in cfg:
        return None
    return primary_quality_key(cfg.data, inception_weights=grid.get("inception_weights"))


def _record_once(path: Path, key: str) -> str:
    """Write ``key`` to ``path`` unless it exists (atomically: the first writer wins); return what it holds."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(key + "\n")
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_text().strip()


def resolve_optimized_metric(cfg: DictConfig) -> str | None:
    """``optimized_metric``, with ``auto`` resolved from the config: the primary sample-quality key of the data
    config (``run_quality_key``), else ``val/loss``. In a sweep whose sweeper compares the returned values (Optuna,
    anything but Hydra's basic sweeper) it is resolved ONCE per sweep: the first job records it in
    ``<sweep dir>/optimized_metric.txt`` and every later job optimises that key (so a study never mixes
    quantities); a job whose own config would give another key says so in one line."""
    name = cfg.get("optimized_metric")
    if name != "auto":
        return name
    key = run_quality_key(cfg) or "val/loss"
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return key
    if str(OmegaConf.select(HydraConfig.get(), "sweeper._target_", default="")).endswith("BasicSweeper"):
        return key  # the basic sweeper compares no return values (e.g. data=mnist,cifar10): each job its own key
    sweep_dir = Path(str(HydraConfig.get().sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    recorded = _record_once(sweep_dir / OPTIMIZED_METRIC_FILE, key)
    if recorded != key:
        log.warning("optimized_metric=auto: this sweep optimises %s (%s), but this job's config logs %s; "
                    "the job fails unless it logs %s", recorded, sweep_dir / OPTIMIZED_METRIC_FILE, key, recorded)
    return recorded
