"""The command line of the entry points and tools, checked before Hydra runs: unknown options and settings,
output dirs that hold a run, unsafe checkpoints (``precheck_command_line``, ``run_entry_point``); which recipe
``train.py`` runs without ``experiment=`` (``choose_experiment``); finding ``conf/`` and composing a run's config
for the tools (``find_conf_dir``, ``compose_with_data``)."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ncsn.app.common import EXIT_USER_ERROR, one_line, quiet_console
from ncsn.errors import UserError


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
    from ncsn.app.checkpoints import refuse_unsafe_checkpoint, trust_flag

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


# ---------------------------------------------------------------------------------------------- config for the tools
def find_conf_dir() -> Path:
    """The project's ``conf/`` dir: $NCSN_CONF_DIR, ./conf, or the one next to the package (editable install)."""
    candidates = []
    if os.environ.get("NCSN_CONF_DIR"):
        candidates.append(Path(os.environ["NCSN_CONF_DIR"]))
    candidates += [Path.cwd() / "conf", Path(__file__).resolve().parents[3] / "conf"]
    for path in candidates:
        if (path / "train.yaml").is_file() and (path / "data").is_dir():
            return path.resolve()
    raise UserError("cannot find the project's conf/ dir (with train.yaml); run from the repository root or "
                    "set NCSN_CONF_DIR")


def data_names(conf_dir: Path) -> list[str]:
    return sorted(p.stem for p in (conf_dir / "data").glob("*.yaml"))


def compose_data_config(conf_dir: Path, overrides: list[str]):
    """``cfg.data`` of conf/train.yaml composed with ``overrides`` (experiment off unless one is given)."""
    name, cfg = compose_with_data(conf_dir, overrides)
    return name, cfg.data


def compose_with_data(conf_dir: Path, overrides: list[str], job_name: str = "sigmas_suggest"):
    """``(data name, cfg)``: conf/train.yaml composed with ``overrides`` as ``train.py`` composes it: the data
    group (``data=mnist_bundled`` unless given, or the experiment's), no experiment unless one is given. One line
    for a bad override."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    names = data_names(conf_dir)
    chosen = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] in ("data", "+data", "++data")]
    name = chosen[-1] if chosen else "mnist_bundled"
    if name not in names:
        raise UserError(f"unknown data {name!r}; choose one of: {', '.join(names)}")
    experiment = any(o.split("=", 1)[0].lstrip("+~") == "experiment" for o in overrides)
    if not experiment:
        overrides = [*overrides, "~experiment"]  # an experiment would override the data choice
        if not chosen:
            overrides = [f"data={name}", *overrides]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3", job_name=job_name):
            cfg = compose(config_name="train", overrides=overrides)
    except Exception as exc:  # a bad override is the user's: one line
        raise UserError(override_error(str(exc), "train")) from exc
    if experiment and not chosen:  # the experiment's data
        from ncsn.metrics.registry import data_fields

        name = str(data_fields(cfg.data).get("name"))
    return name, cfg
