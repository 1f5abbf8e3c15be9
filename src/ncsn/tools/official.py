"""What the official checkpoints hold and how they map onto ours: reading ermongroup/ncsn and ermongroup/ncsnv2
files, checking their tensors and σ list against an experiment's network, and carrying their Adam state over.

* ermongroup/ncsn ``runners/anneal_runner.py`` saves ``[score.state_dict(), optimizer.state_dict()]``, the
  ``CondRefineNetDilated`` wrapped in ``nn.DataParallel`` (every key starts with ``module.``). The file holds no
  σ list: every released model was trained with ``configs/anneal.yml``'s (:data:`NCSN_ANNEAL`).
* ermongroup/ncsnv2 ``runners/ncsn_runner.py`` saves ``[score.state_dict(), optimizer.state_dict(), epoch, step]``
  and, with EMA on, the EMA helper's ``shadow`` (names without ``module.``) as a fifth element; the network's
  state dict carries its σ list as the ``sigmas`` buffer.

``ncsn.tools.convert`` (the command line) builds an ncsn checkpoint from these.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ncsn.errors import CheckpointError

FORMAT_NCSN = "ermongroup/ncsn"
FORMAT_NCSNV2 = "ermongroup/ncsnv2"
SEE = "see README.md, 'Using the official checkpoints'"
#: ermongroup/ncsn configs/anneal.yml ``model`` section: the σ list of every ermongroup/ncsn model (MNIST, CIFAR-10,
#: CelebA), geometric from sigma_begin to sigma_end in num_classes levels
NCSN_ANNEAL = {"sigma_begin": 1.0, "sigma_end": 0.01, "num_classes": 10}


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


def read_official(path: str | os.PathLike, *, trust: bool = False) -> OfficialCheckpoint:
    """Read an official checkpoint (either format) on the CPU; raise a CheckpointError when it is not one.

    Loads through :func:`ncsn.app.checkpoints.read_torch_file` (``weights_only=True`` unless ``trust``, the user's
    ``trust_checkpoint=true``): the files come from the internet, and the official runners store only tensors,
    dicts, lists and numbers (both the zip and the pre-1.6 legacy torch formats are read)."""
    from ncsn.app.checkpoints import UnsafeCheckpointError, read_torch_file

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"'{p}' does not exist; pass the official checkpoint_N.pth to convert")
    if p.is_dir():
        raise CheckpointError(f"'{p}' is a directory; pass the checkpoint file inside it (e.g. checkpoint.pth)")
    try:
        obj = read_torch_file(p, trust=trust)
    except UnsafeCheckpointError:
        raise
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
    if any(n.startswith("res31.") for n in names):
        return "an NCSNv2Deepest (model=ncsnv2_deepest, the FFHQ network)"
    if any(n.startswith("res5.") for n in names):
        return "an NCSNv2Deeper (model=ncsnv2_deeper, the LSUN network)"
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


def official_sigmas(official: OfficialCheckpoint) -> tuple[torch.Tensor, str]:
    """The σ list the official network was trained with, and where it comes from: the file's ``sigmas`` buffer
    (ermongroup/ncsnv2), else ermongroup/ncsn's ``configs/anneal.yml`` (its files hold none)."""
    if official.sigmas is not None:
        return official.sigmas, f"the sigma list in '{official.path}'"
    begin, end, n = NCSN_ANNEAL["sigma_begin"], NCSN_ANNEAL["sigma_end"], NCSN_ANNEAL["num_classes"]
    sigmas = torch.from_numpy(np.exp(np.linspace(np.log(begin), np.log(end), n)))  # as anneal_runner.py builds it
    return sigmas, f"the sigma list of {official.format} models (configs/anneal.yml; '{official.path}' holds none)"


def check_sigmas(file_sigmas: torch.Tensor, ours: torch.Tensor, *, source: str, experiment: str) -> None:
    """The σ list the official network was trained with (``source`` says where it comes from) must be the
    experiment's: the network's level i means σ_i (and NCSNv2 divides by it)."""
    file_sigmas = file_sigmas.detach().double().flatten()
    ours = ours.detach().double().flatten()
    if file_sigmas.shape == ours.shape and torch.allclose(file_sigmas, ours, rtol=1e-5, atol=0.0):
        return
    n = file_sigmas.numel()
    first, last = float(file_sigmas[0]), float(file_sigmas[-1])
    raise CheckpointError(
        f"{source} ({n} levels, {first:g} -> {last:g}) is not experiment={experiment}'s "
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
