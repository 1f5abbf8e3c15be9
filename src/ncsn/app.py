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

    from ncsn.lightning_private import drop_unset_wandb_init_setting

    logger = WandbLogger(**kwargs)
    # No public way exists: WandbLogger always puts the key in the kwargs it keeps for wandb.init, and wandb
    # reports it with termwarn, which no warnings filter reaches. Pinned by tests/test_train_app.py.
    drop_unset_wandb_init_setting(logger, "anonymous")
    return logger


# ---------------------------------------------------------------------------------------------- command line
def _group_options(group_dir) -> list[str]:
    return sorted(p.stem for p in group_dir.glob("*.yaml"))


def _check_writable(path, what: str) -> None:
    from pathlib import Path

    p = Path(path).expanduser().absolute()
    ancestor = p
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{what} '{p}' cannot be created: '{ancestor}' is a file; choose another directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"{what} '{p}' is not writable (no write permission on '{ancestor}'); choose another")


def _holds_a_run(path) -> bool:
    from pathlib import Path

    p = Path(path)
    return any(p.glob("checkpoints/*.ckpt")) or (p / "samples.png").exists() or (p / "metrics.json").exists()


def check_overrides(conf_dir, config_name: str, argv: list[str]) -> None:
    """Compose ``config_name`` with the command line's overrides as Hydra will, so that a misspelt setting
    (``trainer.max_stepz=3``), a setting of a part that is switched off, or an argument that is not ``key=value``
    is one line instead of Hydra's report. Skipped for Hydra's own flags (``-m`` sweeps, ``--cfg``): Hydra
    parses those itself."""
    if any(arg.startswith("-") for arg in argv):
        return
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    overrides = [arg for arg in argv if not arg.lstrip("+~").startswith("hydra")]  # Hydra's own settings
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            compose(config_name=config_name, overrides=overrides)
    except HydraException as exc:
        raise UserError(override_error(str(exc), config_name)) from None
    finally:
        GlobalHydra.instance().clear()


def override_error(message: str, config_name: str) -> str:
    """Hydra's composition error as one line that says what to do."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    unknown = re.match(r"Could not override '([^']+)'", lines[0])
    if unknown:
        new = re.search(r"use \+(\S+)", message)
        return (f"'{unknown.group(1)}' is not a setting of this config (misspelt, or its part is switched off); "
                f"`python {config_name}.py --cfg job` lists them"
                + (f", and +{new.group(1)} adds a new one" if new else ""))
    parse = re.match(r"Error parsing override '([^']+)'", lines[0])
    if parse:
        return f"cannot read the argument '{parse.group(1)}' ({lines[1]}); write key=value"
    return one_line(" ".join(line for line in lines if not line.startswith(("See https", "Config search"))))


def precheck_command_line(conf_dir, argv: list[str], config_name: str | None = None) -> None:
    """Catch, before Hydra composes anything or creates a directory, the command-line mistakes Hydra would
    report in many lines or act on destructively:

    * an unknown option of a config group (``data=foo``, ``experiment=bar``): one line listing the valid ones;
    * with ``config_name``, any override Hydra cannot apply (:func:`check_overrides`);
    * ``hydra.run.dir`` pointing at an earlier run (never overwritten; a training run is resumed with
      ``auto_resume=true`` or ``ckpt_path=`` inside it: only ``train`` may use a run's own dir) or somewhere that
      cannot be written;
    * a checkpoint (``ckpt_path=``, or ``auto_resume=true``'s last.ckpt in ``hydra.run.dir``) that holds objects
      whose loading would run code, unless ``trust_checkpoint=true`` (the loaders refuse it too; here the
      refusal comes before Hydra creates the run dir).
    """
    from pathlib import Path

    conf_dir = Path(conf_dir)
    values: dict[str, str] = {}
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        values[key] = value
        if key.startswith("hydra") or "(" in value or key.startswith("debug") and value == "null":
            continue
        group_dir = conf_dir / key
        if not group_dir.is_dir():
            continue
        options = _group_options(group_dir)
        for option in value.split(","):
            option = option.strip()
            if option and option != "null" and option not in options:
                raise UserError(f"unknown {key} '{option}'; choose one of: {', '.join(options)}")
    if config_name is not None:
        check_overrides(conf_dir, config_name, argv)
    run_dir = values.get("hydra.run.dir")
    if run_dir:
        resuming = config_name in (None, "train") and (values.get("auto_resume", "false").lower() == "true" or (
            values.get("ckpt_path") and Path(values["ckpt_path"]).absolute().is_relative_to(Path(run_dir).absolute())
        ))
        if Path(run_dir).exists() and _holds_a_run(run_dir) and not resuming:
            raise UserError(
                f"output dir '{run_dir}' already holds a run and is never overwritten; choose a new hydra.run.dir"
                + (" or resume that run with auto_resume=true" if config_name in (None, "train") else "")
            )
        _check_writable(run_dir, "output dir")
    else:
        _check_writable(values.get("paths.log_dir", "outputs"), "output dir")
    _refuse_unsafe_checkpoint(values)


def _refuse_unsafe_checkpoint(values: dict[str, str]) -> None:
    """The command line's checkpoint is refused before anything is written when loading it could run code.
    Only plain paths to existing files are checked here (a quoted or interpolated value is left to the loader)."""
    from pathlib import Path

    ckpt = values.get("ckpt_path")
    if not ckpt and values.get("auto_resume", "false").lower() == "true" and values.get("hydra.run.dir"):
        ckpt = str(Path(values["hydra.run.dir"]) / "checkpoints" / "last.ckpt")
    if not ckpt or not Path(ckpt).is_file():
        return
    from ncsn.checkpoints import refuse_unsafe_checkpoint, trust_flag

    if not trust_flag(values.get("trust_checkpoint", "false")):
        refuse_unsafe_checkpoint(ckpt)


GPU_EXPERIMENT = "mnist"
CPU_EXPERIMENT = "cpu"


def _asks_for_cpu(argv: list[str]) -> str | None:
    """The argument that puts training on the CPU (``trainer=cpu``, ``trainer.accelerator=cpu``), if any."""
    for arg in argv:
        key, _, value = arg.lstrip("+~").partition("=")
        if (key, value) in (("trainer", "cpu"), ("trainer.accelerator", "cpu")):
            return arg
    return None


def choose_experiment(argv: list[str], cuda_available: bool, gpu_name: str = "") -> tuple[list[str], str | None]:
    """``train.py`` without ``experiment=``: the GPU recipe where a CUDA GPU is visible and training is not put
    on the CPU (``trainer=cpu``, ``trainer.accelerator=cpu``), the CPU recipe otherwise. Returns the command line
    to run and the one line that says what was picked and why (None when the user chose: an explicit
    ``experiment=...`` always wins, and ``~experiment`` runs the base config without one)."""
    if any(a.lstrip("+~").split("=", 1)[0] == "experiment" for a in argv):
        return argv, None
    cpu_arg = _asks_for_cpu(argv)
    if cuda_available and cpu_arg is None:
        name = f" ({gpu_name})" if gpu_name else ""
        line = (f"ncsn: a CUDA GPU is visible{name}: running experiment={GPU_EXPERIMENT}, the GPU recipe "
                f"(about 5 minutes on one H100); add experiment=NAME to choose another")
        return _with_override(argv, f"experiment={GPU_EXPERIMENT}"), line
    why = f"{cpu_arg} puts training on the CPU" if cpu_arg else "no CUDA GPU found"
    line = (f"ncsn: {why}: running experiment={CPU_EXPERIMENT}, the CPU recipe (about 10 minutes "
            f"on 2 cores), instead of the GPU recipe experiment={GPU_EXPERIMENT} (over 8 hours on a CPU); add "
            f"experiment=NAME to choose another")
    return _with_override(argv, f"experiment={CPU_EXPERIMENT}"), line


def _with_override(argv: list[str], override: str) -> list[str]:
    """``argv`` with ``override`` placed beside the other overrides: Hydra's parser takes the overrides as one run
    of positional arguments, so one appended after ``--cfg job`` would be rejected."""
    last = max((i for i, a in enumerate(argv) if "=" in a and not a.startswith("-")), default=None)
    if last is None:
        return [override, *argv]
    return [*argv[:last + 1], override, *argv[last + 1:]]


def pick_default_experiment() -> None:
    """Apply :func:`choose_experiment` to ``sys.argv`` (so a DDP re-launch runs the same experiment) and say
    which recipe was picked, on stderr."""
    import torch

    cuda = torch.cuda.is_available()
    argv, line = choose_experiment(sys.argv[1:], cuda, torch.cuda.get_device_name(0) if cuda else "")
    if line is not None:
        sys.argv[1:] = argv
        print(line, file=sys.stderr, flush=True)


def run_entry_point(main: Callable[[], Any], conf_dir, argv: list[str], pick_experiment: bool = False,
                    config_name: str | None = None) -> None:
    """Pre-check the command line (one clear line and exit 2 on a mistake), then run the Hydra main.
    ``pick_experiment``: choose the GPU or CPU recipe when no experiment is given (train.py); ``config_name``:
    the entry's config (``train``, ``sample``), to check the overrides against it."""
    if os.environ.get("LOCAL_RANK", "0") != "0":  # a DDP child re-launched by Lightning: already checked
        quiet_console()
        main()
        return
    if pick_experiment:
        pick_default_experiment()
        argv = sys.argv[1:]
    try:
        precheck_command_line(conf_dir, argv, config_name)
    except UserError as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
    quiet_console()
    main()
