"""The training application: config → datamodule + module + callbacks + loggers → Trainer.fit.

``train(cfg)`` is what ``train.py`` calls; it returns the configured metric (``optimized_metric``) so
Hydra sweepers can optimise it.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar
from omegaconf import DictConfig, OmegaConf, open_dict

from ncsn.app import _in_multirun, instantiate, instantiate_group
from ncsn.callbacks import MetricsFileCallback, RngStateCallback, RunRecordCallback
from ncsn.checkpoints import (
    AtomicCheckpointIO,
    check_checkpoint_matches,
    check_checkpoint_path,
    load_checkpoint,
)
from ncsn.errors import ConfigError
from ncsn.sweeps import apply_sweep_metadata

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
    """Errors the Trainer would only report deep inside: accelerator availability."""
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError("trainer=gpu needs a CUDA GPU and none is visible; use trainer=cpu or trainer=default")


def build(cfg: DictConfig) -> dict[str, Any]:
    """Build every object of a training run from its config (nothing is run)."""
    datamodule: L.LightningDataModule = instantiate(cfg.data)
    model: L.LightningModule = instantiate(cfg.model)
    callbacks: list[L.Callback] = instantiate_group(cfg.get("callbacks"))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    callbacks.append(RunRecordCallback(resolved, output_dir(cfg) / "checkpoints"))
    callbacks.insert(0, MetricsFileCallback(output_dir(cfg) / "metrics.json"))  # first: its hooks time the steps
    # before the other callbacks' (sample grids) and end the training time before the end-of-training grid
    callbacks.append(RngStateCallback())
    callbacks.append(FinalLastCheckpoint())  # last: after the other callbacks' on_train_end
    fall_back_to_offline_wandb(cfg)
    loggers = instantiate_group(cfg.get("logger"))
    if not loggers:  # nothing to report learning rates to (Lightning would refuse to start)
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a bar callback with the bar off
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    check_trainer_config(cfg)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                     plugins=[AtomicCheckpointIO()])
    if "batch_size" in cfg.data:  # fail before processes are launched, not inside each of them
        from ncsn.data.datamodules import per_device_batch_size

        per_device_batch_size(cfg.data.batch_size, trainer.world_size)
    return {"datamodule": datamodule, "model": model, "callbacks": callbacks, "loggers": loggers,
            "trainer": trainer}


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


class FinalLastCheckpoint(L.Callback):
    """Makes ``last.ckpt`` hold the final step. Lightning only refreshes it at its periodic saves, so a run that
    stops between two (``max_time``, ``max_steps`` not a multiple of the interval) would keep older weights.
    Saved in ``on_train_end``, inside the training processes (under ``ddp_spawn`` the launching process has
    neither the final step nor the callbacks' state), after the other callbacks' end-of-training hooks (but
    ModelCheckpoint's, which Lightning runs last)."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        callback = trainer.checkpoint_callback
        if callback is None or not getattr(callback, "save_last", False) or callback.dirpath is None:
            return
        if getattr(callback, "_last_global_step_saved", None) == trainer.global_step:
            return
        trainer.save_checkpoint(str(Path(callback.dirpath) / "last.ckpt"), weights_only=False)
        # tell ModelCheckpoint (which runs its on_train_end after this one) that "last" is saved at this step,
        # or Lightning 2.6 writes a second copy as last-v1.ckpt
        callback._last_checkpoint_saved = True
        callback._last_global_step_saved = trainer.global_step


def close_loggers(loggers: list) -> None:
    """Close W&B runs so the next job of a multirun starts its own run."""
    from lightning.pytorch.loggers import WandbLogger

    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        if wandb.run is not None:
            wandb.finish()


def optimized_metric_name(name: str | None, metrics) -> str | None:
    """``optimized_metric``, with ``auto`` resolved: the run's sample-quality key when it logged one, else
    ``val/loss``."""
    if name != "auto":
        return name
    from ncsn.callbacks import quality_key_in

    return quality_key_in(metrics) or "val/loss"


def train(cfg: DictConfig) -> float | None:
    """Train one run; return the value of ``cfg.optimized_metric`` (None if it was never logged)."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    prepare_ddp_relaunch()
    apply_sweep_metadata(cfg)
    run_dir = output_dir(cfg)
    log.info("Run directory: %s", run_dir.resolve())

    ckpt_path = resume_checkpoint(cfg)
    resume_from = load_checkpoint(ckpt_path) if ckpt_path else None  # read once for both checks below
    if resume_from is not None:
        continue_wandb_run(cfg, resume_from)
    objects = build(cfg)
    trainer: L.Trainer = objects["trainer"]
    if resume_from is not None:
        check_checkpoint_matches(objects["model"], resume_from, ckpt_path)
        del resume_from  # Lightning reads the file itself in fit; don't hold a second copy in memory
        log.info("Resuming from %s", ckpt_path)
    for logger in objects["loggers"]:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    saved_env = {k: os.environ.get(k) for k in DDP_ENV}
    try:
        trainer.fit(objects["model"], datamodule=objects["datamodule"], ckpt_path=ckpt_path)
    finally:
        close_loggers(objects["loggers"])
        reset_distributed(saved_env)

    metric_name = optimized_metric_name(cfg.get("optimized_metric"), trainer.callback_metrics)
    value = trainer.callback_metrics.get(metric_name) if metric_name else None
    if not trainer.is_global_zero:
        return None if value is None else float(value)

    # The closing lines (rank zero): the last sample grid, its quality, the checkpoint and the command that samples
    # from it, as printed lines a user can copy.
    import json
    import shlex
    import shutil

    from ncsn.callbacks import SampleGridCallback

    def shown(path: Path) -> str:  # relative to the working dir when inside it, else absolute
        path = path.absolute()
        return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)

    lines = []
    grids = sorted(p for cb in trainer.callbacks if isinstance(cb, SampleGridCallback)
                   for p in (Path(trainer.default_root_dir) / cb.dirname).glob("step_*.png"))
    if grids:
        lines.append(f"samples grid:   {grids[-1].resolve()}")
    try:  # written by the training process (under ddp_spawn this process's trainer did not train)
        record = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        record = {}
    quality = record.get("quality") or {}
    last = (quality.get("history") or [{}])[-1]
    quality_key = quality.get("metric")
    if quality_key in last:
        final = last.get("step") == record.get("global_step", trainer.global_step)
        when = "final samples" if final else f"samples at step {last.get('step')}"
        lines.append(f"sample quality: {quality_key} {last[quality_key]:.3g} ({when}; lower is better)")
    if metric_name and (metric_name != quality_key or _in_multirun()):
        log.info("optimized_metric %s = %s", metric_name, "(not logged)" if value is None else f"{float(value):.5g}")
    checkpoint_callback = trainer.checkpoint_callback
    ckpt = None
    if checkpoint_callback is not None and getattr(checkpoint_callback, "dirpath", None):
        ckpt = Path(checkpoint_callback.dirpath) / "last.ckpt"  # the final step (FinalLastCheckpoint)
        if not ckpt.is_file():
            ckpt = Path(checkpoint_callback.last_model_path) if checkpoint_callback.last_model_path else None
    if ckpt is not None and ckpt.is_file():
        lines.append(f"checkpoint:     {ckpt.resolve()}")
        # `python` when it is this interpreter (an activated venv), else this interpreter's path (`make train`)
        on_path = shutil.which("python")
        python = ("python" if on_path and Path(on_path).absolute().parent == Path(sys.executable).absolute().parent
                  else shown(Path(sys.executable)))
        sample_py = next((p for p in (Path(sys.argv[0]).absolute().with_name("sample.py"), Path.cwd() / "sample.py",
                                      Path(__file__).resolve().parents[2] / "sample.py") if p.is_file()),
                         Path("sample.py"))
        lines.append(f"sample from it: {python} {shown(sample_py)} ckpt_path={shlex.quote(str(ckpt.resolve()))} "
                     "num_samples=256")
    if lines:
        print("\n".join(lines), flush=True)
    return None if value is None else float(value)
