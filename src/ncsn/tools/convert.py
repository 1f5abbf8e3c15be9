"""Convert a released checkpoint of the official code into an ncsn checkpoint.

    python -m ncsn.tools.convert SRC experiment=NAME [out=PATH] [step=N] [trust_checkpoint=true] [Hydra overrides ...]

SRC is a ``checkpoint_N.pth`` (or ``checkpoint.pth``) written by ermongroup/ncsn or ermongroup/ncsnv2; what
those files hold, and how their names, σ lists and Adam state map onto ours, is in :mod:`ncsn.tools.official`.

The experiment (``conf/experiment/NAME.yaml`` plus any overrides) says which network, σ list, sampler and
data the weights belong to; README "Using the official checkpoints" has the table. The output is a
checkpoint like the ones train.py writes, so ``sample.py ckpt_path=OUT`` samples from it and
``train.py experiment=NAME ckpt_path=OUT`` fine-tunes it:

* ``ncsn_config``: the resolved run config (as ``RunRecordCallback`` stores it);
* ``state_dict``: the weights to sample with (ScoreModel keys: ``sigmas`` + ``net.*``), the EMA weights
  when the file has them (as the official sampler uses them), and ``current_model_state`` the raw weights
  (the same tensors when there is no EMA), with ``averaging_state`` for the EMA callback;
* ``optimizer_states``: the official Adam moments, re-indexed from the official parameter order (the
  file's key order, which is the order the official optimizer was built in) to ours, with the experiment's
  learning rate and betas; ``lr_schedulers`` as the experiment builds them;
* ``global_step``/``epoch`` and the loop counters, so training continues at the official step (ermongroup/ncsn
  files hold no step counter: it is taken from Adam's step count, or ``step=N``).

Every mismatch (not an official checkpoint, a network that does not fit the weights, a missing or extra
tensor, a σ list that is not the experiment's (for ermongroup/ncsn files, which hold none: not
configs/anneal.yml's 1 -> 0.01 in 10 levels), an output path that exists, a SRC that holds objects whose
loading would run code (read only with ``trust_checkpoint=true``)) ends with one ``error:`` line
on stderr and exit code 2, and nothing is written. The output is written to ``OUT.part`` and linked into
place, so an existing file is never overwritten and a killed run leaves no partial checkpoint.
"""

from __future__ import annotations

import os
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from ncsn.app.checkpoints import trust_flag
from ncsn.errors import UserError
from ncsn.tools.official import (
    SEE,
    OfficialCheckpoint,
    _adam_step_count,
    _network_kind,
    check_sigmas,
    check_weights,
    official_sigmas,
    read_official,
    remap_optimizer_state,
)

OWN_KEYS = ("out", "step", "trust_checkpoint")
USAGE = ("usage: python -m ncsn.tools.convert SRC experiment=NAME [out=PATH] [step=N] [trust_checkpoint=true] "
         "[Hydra overrides ...]")


# ---------------------------------------------------------------------------------------------- config
def compose_train_config(overrides: list[str], output_dir: Path):
    """conf/train.yaml composed with ``overrides`` (Hydra's compose API, as the tests do)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ncsn.app.command_line import find_conf_dir, precheck_command_line

    conf_dir = find_conf_dir()
    # an unknown experiment or group option: one line (and the output's directory must be writable)
    precheck_command_line(conf_dir, [*overrides, f"paths.log_dir={output_dir}"])
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3", job_name="convert"):
            return compose(config_name="train", overrides=[f"paths.output_dir={output_dir}", *overrides])
    except Exception as exc:  # a bad override is the user's: one line
        from ncsn.app.command_line import override_error

        raise UserError(override_error(str(exc), "train")) from exc


def experiment_of(overrides: list[str]) -> str:
    names = [o.split("=", 1)[1] for o in overrides if o.lstrip("+~").split("=", 1)[0] == "experiment"]
    if not names or not names[-1] or names[-1] == "null":
        raise UserError(f"pass experiment=NAME: the experiment the released model belongs to ({SEE}); {USAGE}")
    return names[-1]


# ---------------------------------------------------------------------------------------------- building
def _clone_state(module: torch.nn.Module) -> OrderedDict[str, torch.Tensor]:
    return OrderedDict((k, v.detach().clone()) for k, v in module.state_dict().items())


def build_checkpoint(official: OfficialCheckpoint, cfg, *, experiment: str, step: int | None = None
                     ) -> tuple[dict[str, Any], list[str]]:
    """The ncsn checkpoint for ``official`` under the composed train config ``cfg``; returns it and the
    lines that say what was found and done."""
    import lightning as L
    from omegaconf import OmegaConf

    from ncsn.app.common import instantiate
    from ncsn.app.lightning_private import loop_state_at

    notes = list(official.notes)
    model = instantiate(cfg.model)
    net_state = model.net.state_dict()
    if set(net_state) != {n for n, _ in model.net.named_parameters()}:  # a network with buffers: not ours
        raise UserError(f"experiment={experiment}'s network has buffers; only NCSN and the NCSNv2 networks "
                        "can be converted")
    check_weights(official.weights, net_state, path=official.path, experiment=experiment)
    if official.ema is not None:
        check_weights(official.ema, net_state, path=official.path, experiment=experiment,
                      what="the file's EMA helper")
    trained_with, source = official_sigmas(official)
    check_sigmas(trained_with, model.sigmas, source=source, experiment=experiment)
    notes.append(f"sigma list matches experiment={experiment} ({trained_with.numel()} levels, "
                 f"{float(trained_with[0]):g} -> {float(trained_with[-1]):g}"
                 + (")" if official.sigmas is not None else f"; {official.format} configs/anneal.yml's)"))

    model.net.load_state_dict(official.weights, strict=True)
    raw = _clone_state(model)
    if official.ema is not None:
        model.net.load_state_dict(official.ema, strict=True)
        notes.append("EMA weights found: state_dict = EMA (sampling uses them, as the official sampler does), "
                     "current_model_state = raw")
        averaged = _clone_state(model)
    else:
        averaged = OrderedDict((k, v.clone()) for k, v in raw.items())

    # the step and epoch to continue from
    if step is None:
        if official.step is not None:
            step = official.step
        else:
            step = _adam_step_count(official.optimizer)
            if step is None:
                step = 0
                notes.append(f"an {official.format} checkpoint holds no step counter and Adam's is unusable: "
                             "global_step 0 (pass step=N to set it)")
            else:
                notes.append(f"an {official.format} checkpoint holds no step counter: global_step {step} "
                             "from Adam's step count (pass step=N to set it)")
    epoch = official.epoch + 1 if official.epoch is not None else 0

    # optimizer and scheduler, built as Lightning would for this experiment
    optimizer, scheduler = model.optimizer_and_scheduler()
    our_names = [n for n, _ in model.named_parameters()]
    file_order = [f"net.{n}" for n in official.weights]
    optimizer_state, line = remap_optimizer_state(official.optimizer, file_order, optimizer, our_names)
    if optimizer_state is None:
        optimizer_state = optimizer.state_dict()
        line += "; train.py starts with a fresh optimizer state"
    notes.append(f"optimizer: {line}")
    lr_schedulers = [scheduler.state_dict()] if scheduler is not None else []

    callbacks: dict[str, Any] = {}
    ema_cfg = (cfg.get("callbacks") or {}).get("ema")
    if ema_cfg is not None:
        ema_callback = instantiate(ema_cfg)
        callbacks[ema_callback.state_key] = {"latest_update_step": step}
    elif official.ema is not None:
        notes.append(f"experiment={experiment} has no EMA: train.py continues from the raw weights "
                     "(current_model_state); sample.py uses the EMA weights (use_ema=false: the raw ones)")

    checkpoint: dict[str, Any] = {
        "epoch": epoch,
        "global_step": step,
        "pytorch-lightning_version": L.__version__,
        "state_dict": averaged,
        "loops": loop_state_at(step, epoch),
        "callbacks": callbacks,
        "optimizer_states": [optimizer_state],
        "lr_schedulers": lr_schedulers,
        "current_model_state": raw,
        "averaging_state": {"n_averaged": torch.tensor(step if official.ema is not None else 0,
                                                       dtype=torch.long)},
        "ncsn_config": OmegaConf.to_container(cfg, resolve=True),
        "ncsn_converted_from": {"path": str(official.path.resolve()), "format": official.format,
                                "step": step, "official_epoch": official.epoch,
                                "ema": official.ema is not None},
    }
    return checkpoint, notes


# ---------------------------------------------------------------------------------------------- writing
def check_output_path(out: Path) -> None:
    if out.is_dir():
        raise UserError(f"output '{out}' is a directory; pass out=<file>.ckpt")
    if out.exists() or out.is_symlink():
        raise UserError(f"output '{out}' already exists and is never overwritten; pass another out=PATH")


def write_new_file(checkpoint: dict[str, Any], out: Path) -> Path:
    """Write ``checkpoint`` to ``out`` atomically without ever replacing an existing file: ``out.part``
    first (flushed), then hard-linked into place (the link fails if ``out`` appeared meanwhile)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, out)
        except FileExistsError:
            raise UserError(f"output '{out}' already exists and is never overwritten; pass another out=PATH"
                            ) from None
        except OSError:  # a file system without hard links: check, then rename
            check_output_path(out)
            os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def default_output(src: Path, experiment: str) -> Path:
    return src.with_name(f"{src.stem}.{experiment}.ckpt")


def convert(src: str | os.PathLike, overrides: list[str], out: str | os.PathLike | None = None,
            step: int | None = None, *, trust: bool = False, echo=print) -> Path:
    """Convert ``src`` for the experiment in ``overrides``; write it to ``out`` and return that path.
    ``trust``: ``trust_checkpoint=true``, unpickle ``src`` fully (see :func:`ncsn.app.checkpoints.read_torch_file`)."""
    src = Path(src)
    experiment = experiment_of(overrides)
    out = Path(out) if out else default_output(src, experiment)
    check_output_path(out)
    official = read_official(src, trust=trust)
    cfg = compose_train_config(overrides, out.absolute().parent)
    found = [f"{len(official.weights)} tensors of {_network_kind(official.weights)}"]
    if official.step is not None:
        found.append(f"step {official.step}, epoch {official.epoch}")
    found.append("EMA weights" if official.ema is not None else "no EMA weights")
    echo(f"read {src}: {official.format} checkpoint, {', '.join(found)}")
    checkpoint, notes = build_checkpoint(official, cfg, experiment=experiment, step=step)
    for line in notes:
        echo(line)
    write_new_file(checkpoint, out)
    echo(f"wrote {out} (global_step {checkpoint['global_step']})")
    echo(f"  sample:    python sample.py ckpt_path={out}")
    echo(f"  fine-tune: python train.py {' '.join(overrides)} ckpt_path={out} trainer.max_steps=<more>")
    return out


def parse_args(argv: list[str]) -> tuple[Path, list[str], str | None, int | None, bool]:
    """Split the command line into SRC, Hydra overrides and this tool's own ``out=``, ``step=`` and
    ``trust_checkpoint=``."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        raise SystemExit(0)
    sources: list[str] = []
    overrides: list[str] = []
    own: dict[str, str] = {}
    for arg in argv:
        key = arg.split("=", 1)[0] if "=" in arg else None
        if key is None:
            sources.append(arg)
        elif key in OWN_KEYS:
            own[key] = arg.split("=", 1)[1]
        else:
            overrides.append(arg)
    if len(sources) != 1:
        raise UserError(f"pass exactly one official checkpoint file (got {len(sources)}); {USAGE}")
    step = None
    if "step" in own:
        try:
            step = int(own["step"])
        except ValueError:
            raise UserError(f"step must be a whole number >= 0 (got {own['step']!r})") from None
        if step < 0:
            raise UserError(f"step must be a whole number >= 0 (got {step})")
    return Path(sources[0]), overrides, own.get("out") or None, step, trust_flag(own.get("trust_checkpoint", "false"))


def main(argv: list[str] | None = None) -> None:
    from ncsn.app.common import EXIT_USER_ERROR

    argv = sys.argv[1:] if argv is None else argv
    try:
        src, overrides, out, step, trust = parse_args(argv)
        convert(src, overrides, out, step, trust=trust)
    except UserError as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None


if __name__ == "__main__":
    main()
