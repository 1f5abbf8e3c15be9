"""The training application: config → datamodule + module + callbacks + loggers → Trainer.fit.

``train(cfg)`` is what ``train.py`` calls; it returns the configured metric (``optimized_metric``) so
Hydra sweepers can optimise it.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint, LearningRateMonitor, ProgressBar
from omegaconf import DictConfig, OmegaConf, open_dict

from ncsn.app.best_checkpoint import BestQualityCheckpoint
from ncsn.app.checkpoints import (
    AtomicCheckpointIO,
    check_checkpoint_matches,
    check_checkpoint_path,
    load_checkpoint,
    trust_flag,
)
from ncsn.app.common import _in_multirun, instantiate, instantiate_group
from ncsn.app.console import print_closing_lines
from ncsn.app.run_files import MetricsFileCallback, RngStateCallback, RunRecordCallback
from ncsn.app.sweeps import apply_sweep_metadata, resolve_optimized_metric, run_quality_key
from ncsn.errors import ConfigError, UserError

log = logging.getLogger("ncsn")


def _hydra_config() -> DictConfig | None:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def prepare_ddp_relaunch() -> None:
    """Make Lightning's DDP re-launch run just this job.

    With plain ``ddp`` Lightning starts ranks 1..N-1 by re-running ``sys.argv`` with
    ``hydra.run.dir=<run dir>``. Inside a ``-m`` sweep that would re-run the whole sweep in every child and
    put them in the wrong directory. So, in a multirun, replace ``sys.argv`` by this job's own overrides
    and point ``hydra.run.dir`` at this job's output dir: each child runs exactly this job, in its dir.
    """
    from hydra.types import RunMode

    hc = _hydra_config()
    if hc is None or hc.mode != RunMode.MULTIRUN:
        return
    sys.argv = [sys.argv[0], *[str(o) for o in hc.overrides.task]]
    OmegaConf.set_readonly(hc, False)
    with open_dict(hc):
        hc.run.dir = hc.runtime.output_dir
    OmegaConf.set_readonly(hc, True)


def output_dir(cfg: DictConfig) -> Path:
    return Path(cfg.paths.output_dir)


def check_trainer_config(cfg: DictConfig) -> None:
    """Errors the Trainer would only report deep inside or not at all: accelerator availability, a run of no
    steps, a seed that is not a number."""
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        chosen = "trainer=gpu" if accelerator == "gpu" else f"trainer.accelerator={accelerator}"
        raise ConfigError(f"{chosen} needs a CUDA GPU and none is visible; use trainer=cpu or trainer=default")
    if cfg.trainer.get("max_steps") == 0:
        raise ConfigError("trainer.max_steps=0 trains nothing; give a number of steps >= 1 (or -1: no limit)")
    interval = cfg.trainer.get("val_check_interval")
    if interval is not None and not (isinstance(interval, (int, float)) and interval > 0):  # 0: divides by 0
        raise ConfigError(f"trainer.val_check_interval must be > 0: steps (int) or a share of an epoch (float in "
                          f"(0, 1]), or null (got {interval!r})")
    seed = cfg.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32):
        raise ConfigError(f"seed must be a whole number from 0 to 2**32 - 1, or null (got {seed!r})")


def setting_name(node: DictConfig, key: str, own: str) -> str:
    """The setting a user changes for ``node[key]``: the one it copies (``${paths.inception_weights}`` gives
    ``paths.inception_weights``), else its own name ``own``."""
    if OmegaConf.is_interpolation(node, key):
        match = re.fullmatch(r"\$\{([\w.]+)\}", str(OmegaConf.to_container(node, resolve=False)[key]))
        if match:
            return match.group(1)
    return own


def check_run_files(cfg: DictConfig, datamodule: L.LightningDataModule) -> None:
    """Every file the run will read, checked before the first step, so that a wrong path ends the run at its start
    with one line that names the setting instead of hours later: the Inception weights of the quality pass (read only
    for images other than 28-px digits, with the quality pass on) and of any other callback given them, and the
    data files (loaded here, unless ``data.download`` fetches them; Lightning then finds them loaded). The resume
    checkpoint (``ckpt_path``) is checked by :func:`resume_checkpoint`."""
    from ncsn.errors import DataNotFoundError
    from ncsn.metrics.features import INCEPTION_WEIGHTS_URL
    from ncsn.metrics.registry import quality_kind

    for name, node in (cfg.get("callbacks") or {}).items():
        if not isinstance(node, DictConfig) or not node.get("inception_weights"):
            continue
        weights = node.inception_weights
        if str(node.get("_target_", "")).endswith("SampleGridCallback") and not (
                node.get("quality", True) and quality_kind(cfg.data, inception_weights=weights) == "inception"):
            continue  # this run's quality pass does not read them
        if not Path(str(weights)).expanduser().is_file():
            setting = setting_name(node, "inception_weights", f"callbacks.{name}.inception_weights")
            raise ConfigError(f"{setting}={weights}: no such file; download {INCEPTION_WEIGHTS_URL} to that path, "
                              f"or set {setting}=null")
    if getattr(datamodule, "download", False):
        return  # prepare_data downloads them (rank zero), and says what is missing if it cannot
    try:
        datamodule.setup("fit")
    except DataNotFoundError as err:
        if not hasattr(datamodule, "data_dir") or "data.path=" in str(err):  # a folder of images names data.path
            raise
        setting = setting_name(cfg.data, "data_dir", "data.data_dir")
        raise DataNotFoundError(f"{err} ({setting}={datamodule.data_dir})") from err


def build(cfg: DictConfig) -> dict[str, Any]:
    """Build every object of a training run from its config (nothing is run)."""
    check_trainer_config(cfg)
    datamodule: L.LightningDataModule = instantiate(cfg.data)
    model: L.LightningModule = instantiate(cfg.model)
    resolve_quality_monitors(cfg)
    callbacks: list[L.Callback] = instantiate_group(cfg.get("callbacks"))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    callbacks.append(RunRecordCallback(resolved, output_dir(cfg) / "checkpoints"))
    callbacks.insert(0, MetricsFileCallback(output_dir(cfg) / "metrics.json"))  # first: its hooks time the steps
    # before the other callbacks' (sample grids) and end the training time before the end-of-training grid
    callbacks.append(RngStateCallback())
    fall_back_to_offline_wandb(cfg)
    loggers = instantiate_group(cfg.get("logger"))
    if not loggers:  # nothing to report learning rates to (Lightning would refuse to start)
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a bar callback with the bar off
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    # Lightning runs the checkpoint callbacks last, in list order: best.ckpt's first, so that the step's other saves
    # (step_N.ckpt, last.ckpt) hold its record of that step's pass, and a resume from them knows the best so far
    callbacks.sort(key=lambda cb: 0 if not isinstance(cb, Checkpoint) else 1 if isinstance(cb, BestQualityCheckpoint)
                   else 2)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                     plugins=[AtomicCheckpointIO()])
    if "batch_size" in cfg.data:  # fail before processes are launched, not inside each of them
        from ncsn.app.datamodules import per_device_batch_size

        per_device_batch_size(cfg.data.batch_size, trainer.world_size)
    return {"datamodule": datamodule, "model": model, "callbacks": callbacks, "loggers": loggers,
            "trainer": trainer}


def resolve_quality_monitors(cfg: DictConfig) -> None:
    """Callbacks configured with ``monitor: auto`` (``callbacks.best_checkpoint``) monitor the run's primary
    sample-quality key (``ncsn.app.sweeps.run_quality_key``); without one (quality off, data without a metric) they are
    dropped, with one line."""
    nodes = {name: node for name, node in (cfg.get("callbacks") or {}).items()
             if isinstance(node, DictConfig) and node.get("monitor") == "auto"}
    if not nodes:
        return
    key = run_quality_key(cfg)
    with open_dict(cfg):
        for name in nodes:
            if key is None:
                log.info("callbacks.%s: no sample-quality metric in this run, so no best-quality checkpoint", name)
                cfg.callbacks[name] = None
            else:
                cfg.callbacks[name].monitor = key


def wandb_has_credentials() -> bool:
    import netrc
    import os

    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def fall_back_to_offline_wandb(cfg: DictConfig) -> None:
    """W&B online without an API key would fail inside wandb.init: log offline instead, and say so."""
    import os

    wandb_cfg = (cfg.get("logger") or {}).get("wandb")
    if not wandb_cfg or wandb_cfg.get("offline", True) or os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        return
    if not wandb_has_credentials():
        log.warning("W&B online was asked for but no API key is set (WANDB_API_KEY or `wandb login`): "
                    "logging offline into the run dir instead; sync later with `wandb sync`")
        with open_dict(cfg):
            cfg.logger.wandb.offline = True


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """The checkpoint to resume from: ``ckpt_path``, or with ``auto_resume=true`` the run dir's last.ckpt."""
    ckpt_path = cfg.get("ckpt_path")
    if not ckpt_path and cfg.get("auto_resume"):
        last = output_dir(cfg) / "checkpoints" / "last.ckpt"
        if last.is_file():
            ckpt_path = str(last)
    return str(check_checkpoint_path(ckpt_path)) if ckpt_path else None


def continue_wandb_run(cfg: DictConfig, ckpt: dict) -> None:
    """Resume the W&B run the checkpoint was logged to (its id is stored in the checkpoint)."""
    wandb_cfg = (cfg.get("logger") or {}).get("wandb")
    if not wandb_cfg or wandb_cfg.get("id"):
        return
    run_id = ckpt.get("wandb_run_id")
    if run_id:
        with open_dict(cfg):
            cfg.logger.wandb.id = run_id
            cfg.logger.wandb.resume = "allow"


DDP_ENV = ("LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")


def reset_distributed(saved_env: dict) -> None:
    """After a job of a multirun: tear down the process group and restore the environment Lightning's DDP
    launcher changed, so the next job launches its own processes instead of joining the dead ones."""
    if not _in_multirun():
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for key, value in saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def close_loggers(loggers: list) -> None:
    """Close W&B runs so the next job of a multirun starts its own run."""
    from lightning.pytorch.loggers import WandbLogger

    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        if wandb.run is not None:
            wandb.finish()


class OptimizedMetricMissing(UserError):
    """A sweep job did not log the key its sweep optimises."""


def optimized_value(metric_name: str | None, metrics) -> float | None:
    """The value of ``metric_name`` among the run's final ``metrics``. In a sweep a missing key is an error (one
    line: the job fails, never another quantity); in a single run a warning line and None."""
    if not metric_name:
        return None
    value = metrics.get(metric_name)
    if value is not None:
        return float(value)
    line = (f"optimized_metric {metric_name} was not logged by this run (logged: "
            f"{', '.join(sorted(k for k in metrics if k.startswith(('quality/', 'val/loss')))) or 'nothing'})")
    if _in_multirun():
        raise OptimizedMetricMissing(line)
    log.warning(line)
    return None


def train(cfg: DictConfig) -> float | None:
    """Train one run; return the value of ``cfg.optimized_metric`` (None if it was never logged)."""
    check_trainer_config(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    prepare_ddp_relaunch()
    apply_sweep_metadata(cfg)
    metric_name = resolve_optimized_metric(cfg)
    run_dir = output_dir(cfg)
    log.info("Run directory: %s", run_dir.resolve())

    ckpt_path = resume_checkpoint(cfg)
    trust = trust_flag(cfg.get("trust_checkpoint", False))
    resume_from = load_checkpoint(ckpt_path, trust=trust) if ckpt_path else None  # read once for both checks below
    if resume_from is not None:
        continue_wandb_run(cfg, resume_from)
    objects = build(cfg)
    check_run_files(cfg, objects["datamodule"])
    trainer: L.Trainer = objects["trainer"]
    if resume_from is not None:
        check_checkpoint_matches(objects["model"], resume_from, ckpt_path)
        del resume_from  # Lightning reads the file itself in fit; don't hold a second copy in memory
        log.info("Resuming from %s", ckpt_path)
    for logger in objects["loggers"]:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    saved_env = {k: os.environ.get(k) for k in DDP_ENV}
    try:
        # Lightning reads the file again through AtomicCheckpointIO, i.e. ncsn.app.checkpoints.read_torch_file
        trainer.fit(objects["model"], datamodule=objects["datamodule"], ckpt_path=ckpt_path, weights_only=not trust)
    finally:
        close_loggers(objects["loggers"])
        reset_distributed(saved_env)

    value = optimized_value(metric_name, trainer.callback_metrics)
    if not trainer.is_global_zero:
        return value

    print_closing_lines(trainer, run_dir, metric_name, value)
    return None if value is None else float(value)
