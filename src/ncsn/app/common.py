"""Shared plumbing of the two entry points (train.py, sample.py): building objects from config and turning
user errors into one clear line and a non-zero exit."""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
from collections.abc import Callable
from typing import Any

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from ncsn.errors import ConfigError, UserError
from ncsn.errors import one_line as error_message

log = logging.getLogger("ncsn")

EXIT_USER_ERROR = 2


def one_line(text: str) -> str:
    """A message's lines joined into one."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _user_error_in(exc: BaseException) -> UserError | None:
    """The UserError that caused ``exc`` (Hydra wraps errors raised inside ``instantiate``). Lightning's
    ``MisconfigurationException`` (its error for a setting it rejects, e.g. ``trainer.val_check_interval=0`` at
    the start of fit) counts as one."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from omegaconf.errors import InterpolationResolutionError

    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        if isinstance(exc, MisconfigurationException):
            return ConfigError(f"{one_line(exc)} (Lightning rejected a trainer or callbacks setting)")
        if isinstance(exc, InterpolationResolutionError):  # data.batch_size=${nope}
            return ConfigError(f"a ${{...}} value of the config cannot be resolved: {one_line(exc)}")
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def user_errors_exit(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Wrap a Hydra task so a UserError prints ``error: <one line>`` to stderr and exits with code 2.

    With HYDRA_FULL_ERROR=1 the exception propagates with its traceback instead.
    """

    @functools.wraps(task)
    def wrapper(cfg: DictConfig) -> Any:
        try:
            return task(cfg)
        except Exception as exc:
            user_error = _user_error_in(exc)
            if user_error is not None:
                line = one_line(error_message(user_error))
            else:  # the last non-empty line names the cause (for a crashed ddp_spawn child, the child's error)
                text_lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
                line = f"{type(exc).__name__}: {text_lines[-1] if text_lines else ''}"
                log.exception("run failed")
            record_failure(cfg, line)
            if _in_multirun() and os.environ.get("HYDRA_FULL_ERROR") != "1":
                # one failed job must not end the sweep: it is recorded (error.txt) and the sweep goes on. It returns
                # None, not NaN: the Optuna sweeper records a non-number as a FAILED trial, while NaN makes
                # optuna's tell() raise inside the sweeper's own error handler and ends the whole study
                log.error("job failed: %s", line)
                return None
            if user_error is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"error: {line}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapper


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def record_failure(cfg: DictConfig, line: str) -> None:
    """Write the failure's one line to ``<output dir>/error.txt`` (read by the sweep report)."""
    try:
        out = cfg.paths.output_dir
    except Exception:  # noqa: BLE001 - a config without paths has nowhere to record
        return
    try:
        path = os.path.join(str(out), "error.txt")
        os.makedirs(str(out), exist_ok=True)
        with open(path, "w") as f:
            f.write(line + "\n")
    except OSError:
        pass


def instantiate(cfg: DictConfig | dict | None, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that re-raises a UserError from inside the call as itself. Any other error of
    the object's constructor (Lightning's ``Trainer(devices=0)``, torch's ``DataLoader(num_workers=-1)``) was
    caused by the config's values: a ConfigError naming the config entry (``trainer: ...``)."""
    if cfg is None:
        return None
    try:
        return hydra.utils.instantiate(cfg, **kwargs)
    except InstantiationException as exc:
        user_error = _user_error_in(exc)
        if user_error is not None:
            raise user_error from exc
        cause = exc.__cause__ or exc.__context__
        if cause is None:
            raise
        key = re.search(r"full_key: (\S+)", str(exc))
        where = key.group(1) if key else "config"
        raise ConfigError(f"{where}: {type(cause).__name__}: {one_line(cause)}; fix the {where} settings"
                          ) from exc


def instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Build every entry of a config group written as ``name: {_target_: ...}`` (null entries skipped)."""
    if not cfg:
        return []
    objects = []
    for name, entry in cfg.items():
        if entry is None:
            continue
        if not isinstance(entry, DictConfig) or "_target_" not in entry:
            raise UserError(f"config entry '{name}' needs a _target_ (got {OmegaConf.to_yaml(entry).strip()})")
        objects.append(instantiate(entry))
    return objects


# ---------------------------------------------------------------------------------------------- console
# Warnings this app's user cannot act on: each is caused inside an installed library (the versions pinned in
# pyproject.toml), not by a setting. Matched by category and the start of the message; anything else still shows.
UNACTIONABLE_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    # reason: Lightning 2.6's own pytree helper (lightning/pytorch/utilities/_pytree.py) builds a LeafSpec,
    # which the installed torch deprecates; nothing in this project or its config calls it
    (FutureWarning, "`isinstance(treespec, LeafSpec)` is deprecated"),
    # reason: only the in-memory datasets (mnist_bundled, toy_gmm: tensors already in RAM) run with fewer than 2
    # loader workers, by choice: a worker would add process start-up and IPC and no speed; the file-backed
    # datasets set num_workers in conf/data/
    (UserWarning, "The 'train_dataloader' does not have many workers"),
    (UserWarning, "The 'val_dataloader' does not have many workers"),
)
LITLOGGER_TIP = "💡 Tip: For seamless cloud logging"  # Lightning 2.6 logs it on every Trainer without a LitLogger


def _not_the_litlogger_tip(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(LITLOGGER_TIP)


def quiet_console() -> None:
    """One console line per log record, and no warning the user cannot act on. Called by the entry points
    before Hydra runs the task.

    * ``import lightning`` attaches its own stderr handler (``INFO: ...``) to the ``lightning`` logger, and
      ``lightning.pytorch`` / ``lightning.fabric`` attach one more (and stop propagation) when the root logger
      has no handler yet, which is the case before Hydra's job logging. Their records also reach the root
      logger, which Hydra's job logging (conf/hydra/default.yaml) gives a console and a file handler, so every
      Lightning line was printed twice. Here those handlers go and propagation is back on: each Lightning line
      goes once to the console and once to ``<run dir>/train.log``, formatted as every other line.
    * the warnings in :data:`UNACTIONABLE_WARNINGS` and Lightning's "try litlogger" tip are dropped.
    """
    import warnings

    import lightning  # noqa: F401 - imported here so that its handlers exist before they are removed

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
    tip_logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _not_the_litlogger_tip not in tip_logger.filters:
        tip_logger.addFilter(_not_the_litlogger_tip)
    inherited = [opt for opt in os.environ.get("PYTHONWARNINGS", "").split(",") if opt]
    for category, message in UNACTIONABLE_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message), category=category)
        # processes started by spawning (trainer=ddp_sim's workers) do not run this function: they read the same
        # filters from PYTHONWARNINGS (the -W syntax: a literal start of the message, up to a comma)
        option = f"ignore:{message.split(',')[0]}:{category.__name__}"
        if option not in inherited:
            inherited.append(option)
    os.environ["PYTHONWARNINGS"] = ",".join(inherited)


def wandb_logger(**kwargs: Any):
    """Lightning's ``WandbLogger`` (conf/logger/wandb.yaml), less the ``anonymous=None`` it always passes to
    ``wandb.init``: wandb >= 0.19 warns "The anonymous setting has no effect" for any value of it, None
    included, although no one set it."""
    from lightning.pytorch.loggers import WandbLogger

    from ncsn.app.lightning_private import drop_unset_wandb_init_setting

    logger = WandbLogger(**kwargs)
    # No public way exists: WandbLogger always puts the key in the kwargs it keeps for wandb.init, and wandb
    # reports it with termwarn, which no warnings filter reaches. Pinned by tests/test_train_app.py.
    drop_unset_wandb_init_setting(logger, "anonymous")
    return logger
