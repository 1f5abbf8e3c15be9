"""Which of PyTorch's CPU kernel sets a CPU run uses (AVX2 or AVX-512), measured once per machine (issue 37).

PyTorch runs its AVX-512 kernels on any CPU that has AVX-512. ATen reads ``ATEN_CPU_CAPABILITY`` and oneDNN
``ONEDNN_MAX_CPU_ISA`` once, when torch initialises, so the choice has to be in the environment before
``import torch``. On some CPUs the AVX2 kernels are faster for our small networks (a 2-core AMD EPYC: 1.2x at
training, 1.7x at sampling the CPU recipe's network), on others the reverse may hold: the choice is measured on
the machine, not assumed.

* :func:`offered_kernel_sets`: the sets PyTorch can run on this CPU, read from ``/proc/cpuinfo`` (no torch);
  the first one is PyTorch's own pick.
* :func:`measure`: times training steps (DSM loss, backward, Adam) and network evaluations (a sampling step) of
  the run's network under each set, each set in its own subprocess (``python -m ncsn.app.cpu_kernels --time``) with
  the environment set; a warm-up, then about 2.5 s + 1.5 s of timed steps per set, of which the fastest step counts
  (other work on the machine only ever slows a step down); about 20 s in all on 2 cores, the imports included.
* a JSON cache (``cpu_kernels.json`` in ``$NCSN_CACHE_DIR``, else ``$XDG_CACHE_HOME/ncsn``, else
  ``~/.cache/ncsn``) keeps the seconds per step, keyed by CPU model, torch version, thread setting and network
  shape; an unreadable file or an entry from another cache version or another set of kernels is ignored with one
  line and measured again.
* :func:`apply_for_entry_point`, the first call of ``train.py`` and ``sample.py`` (before anything imports torch),
  sets the environment of the faster set (inherited by Lightning's DDP processes and data workers) and prints one
  line: which kernels run and why. ``train.py`` takes the set that trains this network faster, ``sample.py`` the
  one that evaluates it faster (both are measured together). Leaving PyTorch's pick takes a 5 % lead
  (:data:`MARGIN`), so noise does not flip it.

Nothing is timed, and at most one line says why, when: ``ATEN_CPU_CAPABILITY`` or ``ONEDNN_MAX_CPU_ISA`` is in the
environment (the user chose: it always wins), ``perf=off`` (``perf.enabled=false``: PyTorch's defaults), the CPU
offers one kernel set, the run is on a CUDA GPU (silent: the CPU kernels hardly matter there), or
``NCSN_CPU_KERNELS=off`` (silent; the test suite sets it). Any failure keeps PyTorch's defaults, with one line.

**The network shape and the config.** The shape is only known once Hydra has composed the run's config, and the
choice must be made before torch is imported, that is before ``@hydra.main`` runs. :func:`apply_for_entry_point`
composes the config itself with Hydra's compose API (about 0.3 s; no torch): for ``train.py`` the same command-line
overrides (with the experiment ``train.py`` would pick without a GPU, and the first value of each sweep), for
``sample.py`` the run's own ``.hydra/config.yaml`` beside the checkpoint's folder (the checkpoint itself can only be
read with torch). Keying on what is cheaper to know (CPU and torch only) would apply one network's measurement to
every other network, and the AVX2 lead shrinks as the networks grow. Both entry points key on the same fields
(network arguments, data shape, the run's training batch, channels_last/bf16), so ``sample.py`` reuses the entry
``train.py`` measured. The sampling step is timed at the training batch too (``sample.py``'s own batch size varies
per call). Hydra and torch are imported inside functions only: importing this module imports neither. That is
also why it sits beside ``ncsn.perf`` and not inside it: importing that package imports torch (``python -m
ncsn.perf calibrate`` runs :func:`calibrate`, which times in subprocesses all the same).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ncsn.app.cpu_timing import (
    BY_NAME,
    SWITCH,
    USER_VARIABLES,
    KernelChoiceError,
    KernelSet,
    Workload,
    cache_key,
    cpu_model,
    cuda_visible,
    offered_kernel_sets,
    thread_setting,
    time_here,
    time_in_subprocess,
    torch_version,
    workload_from_config,
)

#: set by the process that chose (the kernel set's name), so its child processes (DDP) neither time nor print
CHOSEN = "NCSN_CPU_KERNELS_CHOSEN"
CACHE_FILE = "cpu_kernels.json"
CACHE_VERSION = 1
#: how much faster another set must be to leave PyTorch's own pick (time ratio)
MARGIN = 1.05
#: kernel sets run the same arithmetic with other instructions: timings further apart than this mean other work
#: disturbed the measurement (seen here: a busy 2-core machine timed AVX2 47x slower than AVX-512, which the same
#: machine idle measured within 1.2x), and nothing is cached
PLAUSIBLE = 3.0
WORK_WORDS = {"train": "a training step of this network", "sample": "sampling with this network"}

Say = Callable[[str], None]


def say_line(line: str) -> None:
    print(f"ncsn: {line}", file=sys.stderr, flush=True)


Timer = Callable[[KernelSet, Workload], dict[str, float]]


def measure(workload: Workload, sets: Sequence[KernelSet], timer: Timer | None = None) -> dict[str, dict]:
    """Seconds per training step and per sampling step of ``workload`` under each kernel set (``timer``:
    :func:`time_in_subprocess` unless given)."""
    timer = time_in_subprocess if timer is None else timer
    return {kset.name: timer(kset, workload) for kset in sets}


# ---------------------------------------------------------------------------------------------- the cache
def cache_path() -> Path:
    if os.environ.get("NCSN_CACHE_DIR"):
        return Path(os.environ["NCSN_CACHE_DIR"]) / CACHE_FILE
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ncsn" / CACHE_FILE


def read_cache(path: Path, say: Say) -> dict[str, dict]:
    """The cache's entries ({} when there is no file; an unreadable file is ignored with one line)."""
    if not path.exists():
        return {}
    try:
        entries = json.loads(path.read_text())
        if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
            raise ValueError("not a JSON object of entries")
        return entries
    except (OSError, ValueError) as exc:
        say(f"CPU kernel cache {path} is unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:80]}); "
            "ignoring it, measuring again")
        return {}


def write_cache(path: Path, entries: Mapping[str, dict]) -> None:
    """Write atomically (a temporary file renamed into place): a run killed meanwhile leaves the old file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.part")
    try:
        tmp.write_text(json.dumps(dict(entries), indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _usable(entry: dict, sets: Sequence[KernelSet]) -> str | None:
    """Why a cached entry cannot be used (None when it can)."""
    if entry.get("version") != CACHE_VERSION:
        return f"written by cache version {entry.get('version')}, this is {CACHE_VERSION}"
    seconds = entry.get("seconds_per_step")
    if not isinstance(seconds, dict) or sorted(seconds) != sorted(k.name for k in sets):
        return "measured for other kernel sets than this CPU offers"
    for per_work in seconds.values():
        if not isinstance(per_work, dict) or not all(
                isinstance(per_work.get(w), (int, float)) and per_work[w] > 0 for w in WORK_WORDS):
            return "holds no valid timings"
    return None


def measured_entry(workload: Workload, sets: Sequence[KernelSet], path: Path, say: Say,
                   timer: Timer | None = None, force: bool = False, cpuinfo: str | None = None) -> dict:
    """The cache entry for ``workload`` on this machine: read from ``path``, or measured (and written there) when
    it has none, or a stale one, or ``force``."""
    entries = read_cache(path, say)
    key = cache_key(workload, cpuinfo)
    entry = entries.get(key)
    if entry is not None and not force:
        why = _usable(entry, sets)
        if why is None:
            return entry
        say(f"CPU kernel cache entry for this network is stale ({why}); measuring again")
    labels = " and ".join(k.label for k in sets)
    say(f"timing PyTorch's {labels} CPU kernels on this network, once per machine (about 20 s; "
        f"{SWITCH}=off skips it)")
    entry = {"version": CACHE_VERSION, "measured": datetime.date.today().isoformat(),
             "seconds_per_step": measure(workload, sets, timer)}
    spread = max(max(t[w] for t in entry["seconds_per_step"].values()) /
                 min(t[w] for t in entry["seconds_per_step"].values()) for w in WORK_WORDS)
    if spread > PLAUSIBLE:
        say(f"the kernel sets' timings differ {spread:.0f}x, more than kernel sets do: other work on this machine "
            f"disturbed them, so PyTorch's default stays and nothing is cached (measured again next run)")
        return {**entry, "disturbed": True}
    entries[key] = entry
    try:
        write_cache(path, entries)
    except OSError as exc:
        say(f"could not write the CPU kernel cache {path} ({exc.strerror or exc}); measuring again next run")
    return entry


# ---------------------------------------------------------------------------------------------- the choice
@dataclasses.dataclass(frozen=True)
class Choice:
    """The kernel set a run uses (``env`` empty: PyTorch's defaults) and the line that says why."""

    kset: KernelSet | None
    env: Mapping[str, str]
    line: str


def choose(entry: dict, sets: Sequence[KernelSet], work: str, path: Path) -> Choice:
    """The faster set for ``work`` (``train`` or ``sample``) by the entry's timings; PyTorch's pick (the first
    set) unless another is at least :data:`MARGIN` times faster."""
    seconds = {name: times[work] for name, times in entry["seconds_per_step"].items()}
    default = sets[0]
    if entry.get("disturbed"):
        return Choice(default, {}, f"{default.label} kernels (PyTorch's default): the measurement was disturbed")
    best = min(sets, key=lambda k: seconds[k.name])
    if seconds[default.name] / seconds[best.name] < MARGIN:
        best = default
    runner_up = min((k for k in sets if k is not best), key=lambda k: seconds[k.name])
    ratio = seconds[runner_up.name] / seconds[best.name]
    where = f"(measured {entry.get('measured', '?')}, cache {path})"
    own = " (PyTorch's default)" if best is default else ""
    if ratio >= 1:
        why = f"{ratio:.2f}x faster here than {runner_up.label} at {WORK_WORDS[work]}"
    else:
        why = (f"{runner_up.label} is only {1 / ratio:.2f}x faster here at {WORK_WORDS[work]}, under the "
               f"{MARGIN:.2f}x it takes to leave PyTorch's default")
    env = {} if best is default else dict(best.env)
    return Choice(best, env, f"{best.label} kernels{own}: {why} {where}")


def apply(choice: Choice, environ: dict[str, str] | None = None) -> None:
    """Put the choice into the environment (this process, before torch is imported, and its children)."""
    environ = os.environ if environ is None else environ
    environ.update(choice.env)
    environ[CHOSEN] = choice.kset.name if choice.kset is not None else "default"


# ---------------------------------------------------------------------------------------------- entry points
NO_RUN_FLAGS = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion", "-sc",
                "--version")


def overrides_of(argv: Sequence[str]) -> list[str]:
    """The Hydra overrides of a command line, each sweep (``a=1,2``, ``range(...)``) at its first value (a
    multirun's processes share one environment); interval sweeps are left out."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    plain = [a for a in argv if not a.startswith("-") and "=" in a]
    out = []
    for override in OverridesParser.create().parse_overrides(plain):
        if not override.is_sweep_override():
            out.append(override.input_line)
            continue
        try:
            out.append(f"{override.get_key_element()}={next(override.sweep_string_iterator())}")
        except HydraException:  # an interval or glob sweep has no first value: leave it out
            continue
    return out


def _compose(conf_dir: Path, name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(Path(conf_dir).absolute()), version_base="1.3"):
        return compose(name, overrides=overrides)


def _train_run(argv: Sequence[str], conf_dir: Path) -> tuple[bool, Any]:
    """(a CUDA run?, the run config) of ``train.py argv``."""
    from ncsn.app.command_line import choose_experiment

    cuda = cuda_visible()
    argv, _ = choose_experiment(list(argv), cuda)
    cfg = _compose(conf_dir, "train", overrides_of(argv))
    accelerator = str(cfg.trainer.get("accelerator", "auto")).lower()
    return cuda and accelerator != "cpu", cfg


def _sample_run(argv: Sequence[str], conf_dir: Path, say: Say) -> tuple[bool, Any]:
    """(a CUDA run?, the run config of the checkpoint or None) of ``sample.py argv``."""
    from omegaconf import OmegaConf

    cfg = _compose(conf_dir, "sample", overrides_of(argv))
    device = str(cfg.get("device", "auto")).lower()
    cuda = device.startswith("cuda") or (device == "auto" and cuda_visible())
    if cuda or not cfg.get("ckpt_path"):
        return cuda, None  # no checkpoint: sample.py itself says what to pass
    ckpt = Path(str(cfg.ckpt_path)).expanduser().absolute()
    for run_dir in (ckpt.parent.parent, ckpt.parent):
        if (run_dir / ".hydra" / "config.yaml").is_file():
            return False, OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    if ckpt.is_file():
        say(f"PyTorch's default CPU kernels (no run config .hydra/config.yaml beside {ckpt.name}'s run to say "
            "which network to time)")
    return False, None


def decide(work: str, argv: Sequence[str], conf_dir: Path, say: Say = say_line,
           cpuinfo: str | None = None, timer: Timer | None = None, path: Path | None = None) -> Choice | None:
    """The kernel choice for ``train.py`` (``work="train"``) or ``sample.py`` (``"sample"``) run with ``argv``;
    None when nothing is to be chosen (each reason said in at most one line). Raises on failures."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    explicit = [f"{k}={os.environ[k]}" for k in USER_VARIABLES if os.environ.get(k)]
    if explicit:
        say(f"CPU kernels as the environment sets them ({', '.join(explicit)}): nothing timed")
        return None
    try:
        if work == "train":
            cuda, cfg = _train_run(argv, conf_dir)
        else:
            cuda, cfg = _sample_run(argv, conf_dir, say)
    except (HydraException, OmegaConfBaseException):
        return None  # a mistake on the command line: the entry point says it in one line next
    if cuda or cfg is None:
        return None
    workload, perf_off = workload_from_config(cfg)
    sets = offered_kernel_sets(cpuinfo)
    if perf_off:
        say("PyTorch's default CPU kernels (perf=off: nothing timed)")
        return None
    if len(sets) < 2:
        if sets:
            say(f"{sets[0].label} kernels, the only set PyTorch has for this CPU: nothing timed")
        return None
    path = cache_path() if path is None else path
    entry = measured_entry(workload, sets, path, say, timer=timer, cpuinfo=cpuinfo)
    return choose(entry, sets, work, path)


def torch_imported() -> bool:
    return "torch" in sys.modules


def apply_for_entry_point(work: str, argv: Sequence[str], conf_dir: str | os.PathLike, say: Say = say_line) -> None:
    """The first call of ``train.py`` / ``sample.py``: choose and apply the CPU kernels before torch is imported.
    Never raises: any failure keeps PyTorch's defaults, with one line."""
    if os.environ.get(SWITCH, "").strip().lower() in ("off", "0", "false", "no") or CHOSEN in os.environ:
        return  # switched off, or chosen by the process that started this one (a DDP child)
    if any(a.split("=", 1)[0] in NO_RUN_FLAGS for a in argv):
        return  # --help, --cfg job, ...: nothing runs
    if torch_imported():
        say("torch was imported before the CPU kernel choice: PyTorch's default kernels")
        return
    try:
        choice = decide(work, argv, Path(conf_dir), say)
    except Exception as exc:  # noqa: BLE001 - a failed measurement must never stop the run
        say(f"CPU kernel choice failed ({type(exc).__name__}: {str(exc)[:160]}): PyTorch's default kernels")
        choice = None
    if choice is None:
        os.environ[CHOSEN] = "default"
        return
    apply(choice)
    say(choice.line)


# ---------------------------------------------------------------------------------------------- commands
USAGE = ("usage: python -m ncsn.perf calibrate [key=value ...]  (Hydra overrides of train.py: the network to time; "
         "default: the CPU recipe)")


def calibrate(argv: Sequence[str], say: Say = say_line, path: Path | None = None) -> int:
    """``python -m ncsn.perf calibrate [overrides]``: measure the kernel sets for the network of
    ``train.py [overrides]`` on the CPU (the cache entry is replaced) and print the choice for training and for
    sampling."""
    from ncsn.app.command_line import choose_experiment, find_conf_dir

    sets = offered_kernel_sets()
    if len(sets) < 2:
        label = sets[0].label if sets else "no x86"
        say(f"{label} kernels, the only set PyTorch has for this CPU ({cpu_model()}): nothing to calibrate")
        return 0
    argv, _ = choose_experiment(list(argv), cuda_available=False)
    workload, _ = workload_from_config(_compose(find_conf_dir(), "train", overrides_of(argv)))
    path = cache_path() if path is None else path
    say(f"{cpu_model()}, torch {torch_version()}, {thread_setting()}: {workload.describe()}")
    entry = measured_entry(workload, sets, path, say, force=True)
    for name, per_work in entry["seconds_per_step"].items():
        say(f"  {BY_NAME[name].label:8s} training step {per_work['train'] * 1e3:8.1f} ms   "
            f"network evaluation {per_work['sample'] * 1e3:8.1f} ms")
    for work, script in (("train", "train.py"), ("sample", "sample.py")):
        say(f"{script}: {choose(entry, sets, work, path).line}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--time"] and len(argv) == 2:  # the measuring subprocess
        print(json.dumps(time_here(Workload.from_json(argv[1]))), flush=True)
        return 0
    if argv[:1] == ["calibrate"]:
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        from ncsn.errors import UserError

        try:
            return calibrate(argv[1:])
        except (UserError, KernelChoiceError, HydraException, OmegaConfBaseException) as exc:
            print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
            return 2
    print(USAGE, file=sys.stderr)
    return 0 if argv[:1] in (["-h"], ["--help"]) else 2


if __name__ == "__main__":
    sys.exit(main())
