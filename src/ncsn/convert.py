"""Convert a released checkpoint of the official code into an ncsn checkpoint.

    python -m ncsn.convert SRC experiment=NAME [out=PATH] [step=N] [Hydra overrides ...]

SRC is a ``checkpoint_N.pth`` (or ``checkpoint.pth``) written by the official code:

* ermongroup/ncsn ``runners/anneal_runner.py``: ``[score.state_dict(), optimizer.state_dict()]``, the
  ``CondRefineNetDilated`` wrapped in ``nn.DataParallel`` (every key starts with ``module.``);
* ermongroup/ncsnv2 ``runners/ncsn_runner.py``: ``[score.state_dict(), optimizer.state_dict(), epoch, step]``
  and, with EMA on, the EMA helper's ``shadow`` (parameter name -> EMA tensor, names without ``module.``)
  as a fifth element; the network's state dict carries its σ list as the ``sigmas`` buffer.

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
tensor, a σ list that is not the experiment's, an output path that exists) ends with one ``error:`` line
on stderr and exit code 2, and nothing is written. The output is written to ``OUT.part`` and linked into
place, so an existing file is never overwritten and a killed run leaves no partial checkpoint.
"""

from __future__ import annotations

import logging
import os
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ncsn.errors import CheckpointError, UserError

FORMAT_NCSN = "ermongroup/ncsn"
FORMAT_NCSNV2 = "ermongroup/ncsnv2"
OWN_KEYS = ("out", "step")
USAGE = "usage: python -m ncsn.convert SRC experiment=NAME [out=PATH] [step=N] [Hydra overrides ...]"
SEE = "see README.md, 'Using the official checkpoints'"
DEEPER = "a deeper RefineNet (NCSNv2Deeper / NCSNv2Deepest: the LSUN and FFHQ models)"


# ---------------------------------------------------------------------------------------------- reading
@dataclass
class OfficialCheckpoint:
    """What an official checkpoint holds, with the ``module.`` prefix of ``nn.DataParallel`` removed."""

    path: Path
    format: str
    weights: OrderedDict[str, torch.Tensor]  # network parameters in the file's (= the official) order
    optimizer: dict | None
    sigmas: torch.Tensor | None = None
    epoch: int | None = None
    step: int | None = None
    ema: dict[str, torch.Tensor] | None = None
    notes: list[str] = field(default_factory=list)


def _not_official(path: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"'{path}' is not an official ncsn/ncsnv2 checkpoint ({why}); pass a checkpoint_N.pth written by "
        "ermongroup/ncsn (runners/anneal_runner.py) or ermongroup/ncsnv2 (runners/ncsn_runner.py)"
    )


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _strip_module_prefix(state: dict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """Drop the ``module.`` that ``nn.DataParallel`` puts before every key (kept when not all keys have it)."""
    if all(k.startswith("module.") for k in state):
        return OrderedDict((k[len("module."):], v) for k, v in state.items())
    return OrderedDict(state)


def read_official(path: str | os.PathLike) -> OfficialCheckpoint:
    """Read an official checkpoint (either format) on the CPU; raise a CheckpointError when it is not one.

    Loads with ``weights_only=True``: the files come from the internet, and the official runners store only
    tensors, dicts, lists and numbers (both the zip and the pre-1.6 legacy torch formats are read)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"'{p}' does not exist; pass the official checkpoint_N.pth to convert")
    if p.is_dir():
        raise CheckpointError(f"'{p}' is a directory; pass the checkpoint file inside it (e.g. checkpoint.pth)")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # anything torch.load cannot read is not a checkpoint for us
        raise _not_official(p, f"torch.load cannot read it: {type(exc).__name__}") from exc
    if isinstance(obj, dict):
        if "state_dict" in obj and "ncsn_config" in obj:
            raise CheckpointError(f"'{p}' is already an ncsn checkpoint; pass it to sample.py / train.py as "
                                  "ckpt_path= directly")
        keys = ", ".join(sorted(map(str, obj))[:4])
        raise _not_official(p, f"a dict with keys {keys}, not the list the official runners save")
    if not isinstance(obj, (list, tuple)) or len(obj) not in (2, 4, 5):
        what = f"a {type(obj).__name__}" + (f" of {len(obj)} items" if isinstance(obj, (list, tuple)) else "")
        raise _not_official(p, f"{what}, not [state_dict, optimizer, (epoch, step, (ema))]")
    state, optimizer = obj[0], obj[1]
    if not _is_tensor_dict(state):
        raise _not_official(p, "its first item is not a network state dict")
    if not (isinstance(optimizer, dict) and "state" in optimizer and "param_groups" in optimizer):
        raise _not_official(p, "its second item is not an optimizer state dict")
    weights = _strip_module_prefix(state)
    if len(obj) == 2:
        return OfficialCheckpoint(p, FORMAT_NCSN, weights, optimizer)
    epoch, step = obj[2], obj[3]
    if not (isinstance(epoch, int) and isinstance(step, int)) or epoch < 0 or step < 0:
        raise _not_official(p, "its third and fourth items are not the epoch and step counters")
    ema = None
    if len(obj) == 5:
        if not _is_tensor_dict(obj[4]):
            raise _not_official(p, "its fifth item is not the EMA helper's parameter dict")
        ema = dict(_strip_module_prefix(obj[4]))
    sigmas = weights.pop("sigmas", None)
    return OfficialCheckpoint(p, FORMAT_NCSNV2, weights, optimizer, sigmas=sigmas, epoch=epoch, step=step, ema=ema)


# ---------------------------------------------------------------------------------------------- checks
def _network_kind(names) -> str:
    names = list(names)
    if any(n.startswith("res5.") for n in names):
        return DEEPER
    if any(n.endswith(".embed.weight") for n in names):
        return "a noise-conditional NCSN (model=ncsn)"
    if any(n.endswith(".alpha") for n in names):
        return "an NCSNv2 (model=ncsnv2)"
    return "an unknown network"


def check_weights(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], *, path: Path,
                  experiment: str, what: str = "the file") -> None:
    """Raise a CheckpointError naming the first mismatch between the file's tensors and the network's."""
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{what} lacks {len(missing)} tensor(s) the network has (first: {missing[0]})")
        if extra:
            parts.append(f"{what} has {len(extra)} tensor(s) the network lacks (first: {extra[0]})")
        kind_found, kind_expected = _network_kind(found), _network_kind(expected)
        hint = (f"; the file holds {kind_found}, the experiment builds {kind_expected}"
                if kind_found != kind_expected else "")
        raise CheckpointError(f"'{path}' does not fit experiment={experiment}: {' and '.join(parts)}{hint}; "
                              f"pick the experiment of this released model ({SEE})")
    for name, tensor in expected.items():
        if tuple(found[name].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"'{path}' does not fit experiment={experiment}: {name} is {list(found[name].shape)} in "
                f"{what} but {list(tensor.shape)} in the experiment's network (check model.net.ngf, "
                f"data.channels, data.image_size, sigmas.num_scales; {SEE})")


def check_sigmas(file_sigmas: torch.Tensor, ours: torch.Tensor, *, path: Path, experiment: str) -> None:
    """The σ list the official network was trained with must be the experiment's (NCSNv2 divides by it)."""
    file_sigmas = file_sigmas.detach().double().flatten()
    ours = ours.detach().double().flatten()
    if file_sigmas.shape == ours.shape and torch.allclose(file_sigmas, ours, rtol=1e-5, atol=0.0):
        return
    n = file_sigmas.numel()
    first, last = float(file_sigmas[0]), float(file_sigmas[-1])
    raise CheckpointError(
        f"the sigma list in '{path}' ({n} levels, {first:g} -> {last:g}) is not experiment={experiment}'s "
        f"({ours.numel()} levels, {float(ours[0]):g} -> {float(ours[-1]):g}); pick the matching experiment "
        f"or pass sigmas.sigma_max={first:g} sigmas.sigma_min={last:g} sigmas.num_scales={n}")


# ---------------------------------------------------------------------------------------------- optimizer
def _official_adam(opt_state: dict, n_params: int) -> tuple[list[int] | None, str | None]:
    """The official parameter ids in order, or why the file's optimizer state cannot be carried over."""
    groups = opt_state.get("param_groups") or []
    if len(groups) != 1:
        return None, f"it has {len(groups)} parameter groups, not 1"
    ids = list(groups[0].get("params", []))
    if len(ids) != n_params:
        return None, f"it holds {len(ids)} parameters, the network {n_params}"
    if "betas" not in groups[0]:
        return None, "it is not Adam's"
    for entry in opt_state["state"].values():
        if not {"exp_avg", "exp_avg_sq", "step"} <= set(entry):
            return None, "it is not Adam's"
    return ids, None


def remap_optimizer_state(opt_state: dict, file_order: list[str], optimizer: torch.optim.Optimizer,
                          our_names: list[str]) -> tuple[dict | None, str]:
    """The official Adam state re-indexed onto ``optimizer`` (built over the parameters named ``our_names``).

    Optimizer states are keyed by parameter position. The official optimizer was built from the official
    module's ``parameters()``, whose order is the file's state-dict key order (``file_order``); ours may
    register some modules in another order (ermongroup/ncsn's CRP blocks register their convs before their
    norms), so each entry goes to the position of the parameter with the same name. The hyperparameters
    (lr, betas, eps, weight decay) stay the experiment's; only the per-parameter state (step, moments) is
    carried. Returns (state dict or None, one line that says what happened)."""
    if not isinstance(optimizer, torch.optim.Adam):
        return None, f"not carried over: the experiment's optimizer is {type(optimizer).__name__}, not Adam"
    ids, why = _official_adam(opt_state, len(file_order))
    if ids is None:
        return None, f"not carried over: the file's optimizer state does not fit ({why})"
    name_of = dict(zip(ids, file_order, strict=True))
    position = {name: i for i, name in enumerate(our_names)}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    amsgrad = bool(optimizer.param_groups[0].get("amsgrad", False))
    new_state: dict[int, dict[str, torch.Tensor]] = {}
    for pid, entry in opt_state["state"].items():
        if pid not in name_of:
            return None, f"not carried over: the file's optimizer state has an unknown parameter id {pid}"
        index = position[name_of[pid]]
        param = params[index]
        if tuple(entry["exp_avg"].shape) != tuple(param.shape) or tuple(entry["exp_avg_sq"].shape) != tuple(
                param.shape):
            return None, (f"not carried over: Adam's moments for {name_of[pid]} are "
                          f"{list(entry['exp_avg'].shape)}, the parameter {list(param.shape)}")
        step = entry["step"]
        new = {"step": step.detach().clone().float().reshape(()) if torch.is_tensor(step)
               else torch.tensor(float(step)),
               "exp_avg": entry["exp_avg"].detach().clone(), "exp_avg_sq": entry["exp_avg_sq"].detach().clone()}
        if amsgrad:
            max_sq = entry.get("max_exp_avg_sq")
            new["max_exp_avg_sq"] = (max_sq.detach().clone() if max_sq is not None
                                     else entry["exp_avg_sq"].detach().clone())
        new_state[index] = new
    fresh = optimizer.state_dict()
    optimizer.load_state_dict({"state": new_state, "param_groups": fresh["param_groups"]})
    line = f"Adam moments of {len(new_state)} parameters carried over"
    theirs, ours = opt_state["param_groups"][0], fresh["param_groups"][0]
    differ = [f"{k} {theirs[k]} -> {ours[k]}" for k in ("lr", "betas", "eps", "weight_decay")
              if k in theirs and k in ours and tuple(np.atleast_1d(theirs[k])) != tuple(np.atleast_1d(ours[k]))]
    if differ:
        line += f" (hyperparameters are the experiment's: {', '.join(differ)})"
    return optimizer.state_dict(), line


def _adam_step_count(opt_state: dict) -> int | None:
    """The number of optimizer steps Adam took, when every parameter agrees on it."""
    steps = set()
    for entry in (opt_state.get("state") or {}).values():
        step = entry.get("step") if isinstance(entry, dict) else None
        if step is None:
            return None
        steps.add(int(step.item() if torch.is_tensor(step) else step))
    return steps.pop() if len(steps) == 1 else None


# ---------------------------------------------------------------------------------------------- loops
def loops_state(step: int, epoch: int) -> dict[str, Any]:
    """Lightning's loop counters for a run that has taken ``step`` optimizer steps and finished ``epoch``
    epochs, at an epoch boundary: ``Trainer.fit(ckpt_path=...)`` continues at global step ``step`` with a
    fresh pass over the data (epoch index ``epoch``)."""
    import lightning as L

    silenced = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in silenced]
    for logger in silenced:
        logger.setLevel(logging.ERROR)
    try:
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
    finally:
        for logger, level in zip(silenced, levels, strict=True):
            logger.setLevel(level)
    epoch_loop = trainer.fit_loop.epoch_loop
    optimizer_progress = epoch_loop.automatic_optimization.optim_progress.optimizer
    optimizer_progress.step.total.ready = optimizer_progress.step.total.completed = step
    zero_grad = optimizer_progress.zero_grad.total
    zero_grad.ready = zero_grad.started = zero_grad.completed = step
    batches = epoch_loop.batch_progress.total
    batches.ready = batches.started = batches.processed = batches.completed = step
    epoch_loop._batches_that_stepped = step
    for counters in (trainer.fit_loop.epoch_progress.total, trainer.fit_loop.epoch_progress.current):
        counters.ready = counters.started = counters.processed = counters.completed = epoch
    return {"fit_loop": trainer.fit_loop.state_dict(), "validate_loop": trainer.validate_loop.state_dict(),
            "test_loop": trainer.test_loop.state_dict(), "predict_loop": trainer.predict_loop.state_dict()}


# ---------------------------------------------------------------------------------------------- config
def compose_train_config(overrides: list[str], output_dir: Path):
    """conf/train.yaml composed with ``overrides`` (Hydra's compose API, as the tests do)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ncsn.app import precheck_command_line
    from ncsn.schedule_cli import find_conf_dir

    conf_dir = find_conf_dir()
    # an unknown experiment or group option: one line (and the output's directory must be writable)
    precheck_command_line(conf_dir, [*overrides, f"paths.log_dir={output_dir}"])
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3", job_name="convert"):
            return compose(config_name="train", overrides=[f"paths.output_dir={output_dir}", *overrides])
    except Exception as exc:  # a bad override is the user's: one line
        raise UserError(f"cannot compose the config: {str(exc).splitlines()[0]}") from exc


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

    from ncsn.app import instantiate

    notes = list(official.notes)
    model = instantiate(cfg.model)
    net_state = model.net.state_dict()
    if _network_kind(official.weights) == DEEPER:
        raise CheckpointError(f"'{official.path}' holds {DEEPER}; ncsn implements NCSN and NCSNv2 only (the "
                              f"MNIST, CIFAR-10 and CelebA models), so it cannot be converted ({SEE})")
    if set(net_state) != {n for n, _ in model.net.named_parameters()}:  # a network with buffers: not ours
        raise UserError(f"experiment={experiment}'s network has buffers; only NCSN and NCSNv2 can be converted")
    check_weights(official.weights, net_state, path=official.path, experiment=experiment)
    if official.ema is not None:
        check_weights(official.ema, net_state, path=official.path, experiment=experiment,
                      what="the file's EMA helper")
    if official.sigmas is not None:
        check_sigmas(official.sigmas, model.sigmas, path=official.path, experiment=experiment)
        notes.append(f"sigma list matches experiment={experiment} ({official.sigmas.numel()} levels, "
                     f"{float(official.sigmas[0]):g} -> {float(official.sigmas[-1]):g})")
    else:
        notes.append(f"no sigma list in the file ({official.format} keeps it in its config): using "
                     f"experiment={experiment}'s ({model.num_scales} levels, {float(model.sigmas[0]):g} -> "
                     f"{float(model.sigmas[-1]):g})")

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
        "loops": loops_state(step, epoch),
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
            step: int | None = None, *, echo=print) -> Path:
    """Convert ``src`` for the experiment in ``overrides``; write it to ``out`` and return that path."""
    src = Path(src)
    experiment = experiment_of(overrides)
    out = Path(out) if out else default_output(src, experiment)
    check_output_path(out)
    official = read_official(src)
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


def parse_args(argv: list[str]) -> tuple[Path, list[str], str | None, int | None]:
    """Split the command line into SRC, Hydra overrides and this tool's own ``out=`` and ``step=``."""
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
    return Path(sources[0]), overrides, own.get("out") or None, step


def main(argv: list[str] | None = None) -> None:
    from ncsn.app import EXIT_USER_ERROR

    argv = sys.argv[1:] if argv is None else argv
    try:
        src, overrides, out, step = parse_args(argv)
        convert(src, overrides, out, step)
    except UserError as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None


if __name__ == "__main__":
    main()
