"""What ``ncsn.app.cpu_kernels`` chooses between and how it times them: PyTorch's CPU kernel sets and the CPU's
flags (read from ``/proc/cpuinfo``), the workload (the run's network, data shape, batch), and the timing of a
training step and a network evaluation under one set, in this process or in a fresh one. Like ``cpu_kernels``,
importing it imports neither torch nor Hydra."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

#: the environment variables through which the user chooses the kernels (any of them set: nothing is timed)
USER_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
#: ``off`` (or 0/false/no) turns the whole feature off, silently
SWITCH = "NCSN_CPU_KERNELS"
#: seconds of timed steps per set: training steps, then network evaluations
TRAIN_SECONDS, SAMPLE_SECONDS = 2.5, 1.5
CHILD_TIMEOUT_S = 120


@dataclasses.dataclass(frozen=True)
class KernelSet:
    """One of PyTorch's CPU kernel sets: its name, label, the environment that selects it and the value
    ``torch.backends.cpu.get_cpu_capability()`` reports under it."""

    name: str
    label: str
    env: Mapping[str, str]
    capability: str
    cpu_flags: frozenset[str]


#: the x86 sets, most capable first (PyTorch picks the first the CPU runs: its own tests, DispatchStub.cpp)
KERNEL_SETS = (
    KernelSet("avx512", "AVX-512", {"ATEN_CPU_CAPABILITY": "avx512"}, "AVX512",
              frozenset({"avx512f", "avx512vl", "avx512bw", "avx512dq", "fma"})),
    KernelSet("avx2", "AVX2", {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}, "AVX2",
              frozenset({"avx2", "fma"})),
)
BY_NAME = {k.name: k for k in KERNEL_SETS}


class KernelChoiceError(RuntimeError):
    """Measuring or reading the choice failed; the run keeps PyTorch's defaults."""


# ---------------------------------------------------------------------------------------------- this machine
def _cpuinfo(text: str | None) -> str:
    if text is not None:
        return text
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature flags (the ``flags`` line of ``/proc/cpuinfo``; empty where there is none)."""
    for line in _cpuinfo(cpuinfo).splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def offered_kernel_sets(cpuinfo: str | None = None) -> list[KernelSet]:
    """The kernel sets PyTorch can run on this CPU, its own pick first (none on a CPU that is not x86)."""
    flags = cpu_flags(cpuinfo)
    return [k for k in KERNEL_SETS if k.cpu_flags <= flags]


def cpu_model(cpuinfo: str | None = None) -> str:
    for line in _cpuinfo(cpuinfo).splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return " ".join(value.split())
    return platform.processor() or platform.machine() or "unknown CPU"


def describe_kernels() -> str:
    """The kernel set this process's torch runs, and what the CPU offers when that is more, e.g. "AVX2 kernels on
    an AVX-512 CPU" (for benchmark tables; imports torch)."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    running = next((k for k in KERNEL_SETS if k.capability == capability), None)
    label = running.label if running is not None else capability
    sets = offered_kernel_sets()
    if sets and running is not sets[0]:
        return f"{label} kernels on an {sets[0].label} CPU"
    return f"{label} kernels"


def torch_version() -> str:
    """The installed torch's version, read without importing it."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def thread_setting() -> str:
    threads = os.environ.get("OMP_NUM_THREADS")
    return f"{threads} threads" if threads else "default threads"


def cuda_visible() -> bool:
    """Whether a CUDA GPU is likely visible, without importing torch (an NVIDIA device node, and
    ``CUDA_VISIBLE_DEVICES`` not hiding them all)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "x").strip() in ("", "-1"):
        return False
    return any(Path("/dev").glob("nvidia[0-9]*"))


# ---------------------------------------------------------------------------------------------- the network
@dataclasses.dataclass(frozen=True)
class Workload:
    """What is timed: the run's network (its resolved config: a ``_target_`` and arguments), the shape of one
    sample, the training batch and the fast-path features that change the CPU kernels."""

    net: Mapping[str, Any]
    data_shape: tuple[int, ...]
    batch: int
    channels_last: bool = False
    bf16: bool = False

    def describe(self) -> str:
        target = str(self.net.get("_target_", "?")).rsplit(".", 1)[-1]
        args = ", ".join(f"{k}={self.net[k]}" for k in sorted(self.net) if k != "_target_")
        features = "".join(f", {name}" for name in ("channels_last", "bf16") if getattr(self, name))
        shape = "x".join(str(d) for d in (self.batch, *self.data_shape))
        return f"{target}({args}) on {shape}{features}"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Workload:
        data = json.loads(text)
        data["data_shape"] = tuple(data["data_shape"])
        return cls(**data)


def cache_key(workload: Workload, cpuinfo: str | None = None) -> str:
    return f"{cpu_model(cpuinfo)} | torch {torch_version()} | {thread_setting()} | {workload.describe()}"


def workload_from_config(cfg: Any) -> tuple[Workload, bool]:
    """The workload of a composed run config (an OmegaConf ``DictConfig`` of conf/train.yaml) and whether the run
    has the fast path switched off (``perf.enabled`` false)."""
    from omegaconf import OmegaConf

    net = OmegaConf.to_container(cfg.model.net, resolve=True)
    shape = tuple(int(d) for d in OmegaConf.to_container(cfg.model.data_shape, resolve=True))
    perf = OmegaConf.to_container(cfg.perf, resolve=True) if cfg.get("perf") is not None else {}
    enabled = str(perf.get("enabled", "auto")).strip().lower()
    perf_off = enabled in ("false", "off")
    fast_on_cpu = enabled in ("true", "on", "fast")  # auto: the fast path is off on the CPU
    workload = Workload(net=net, data_shape=shape, batch=int(cfg.data.batch_size),
                        channels_last=fast_on_cpu and bool(perf.get("channels_last")),
                        bf16=fast_on_cpu and bool(perf.get("bf16")))
    return workload, perf_off


# ---------------------------------------------------------------------------------------------- timing
def _seconds_per_step(step: Callable[[], Any], budget_s: float, warmup: int = 2) -> float:
    """The fastest time of ``step`` after ``warmup`` calls (other processes only ever slow a step down): at least
    3 timed calls (1 when one takes longer than the budget), at most ``budget_s`` seconds of them."""
    for _ in range(warmup):
        step()
    times: list[float] = []
    end = time.perf_counter() + budget_s
    while len(times) < 3 or time.perf_counter() < end:
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        if times[0] > budget_s:
            break
    return min(times)


def time_here(workload: Workload) -> dict[str, Any]:
    """Time the workload in this process, with whatever kernels torch started with: seconds per training step
    (DSM loss, backward, Adam) and per network evaluation at the training batch, and torch's capability."""
    import torch

    from ncsn.app.common import instantiate
    from ncsn.losses import dsm_loss
    from ncsn.nets import score_function
    from ncsn.perf import PerfRuntime, PerfSettings
    from ncsn.sigmas import geometric_sigmas

    torch.manual_seed(0)
    net = instantiate(dict(workload.net))
    sigmas = geometric_sigmas(1.0, 0.01, int(workload.net.get("num_scales", 10)))
    # the fast path as the run has it on the CPU (torch.compile off: the choice is measured in eager mode)
    settings = PerfSettings(enabled=workload.channels_last or workload.bf16, compile=False,
                            channels_last=workload.channels_last, bf16=workload.bf16).resolve("cpu")
    fast = PerfRuntime().forward_for(net, settings, "cpu")
    score = score_function(net if fast is None else fast, sigmas)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    x = torch.rand(workload.batch, *workload.data_shape)
    levels = torch.randint(len(sigmas), (workload.batch,))

    def train_step() -> None:
        loss = dsm_loss(score, x, sigmas).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def sample_step() -> None:
        with torch.no_grad():
            score(x, levels)

    return {"capability": torch.backends.cpu.get_cpu_capability(),
            "train": _seconds_per_step(train_step, TRAIN_SECONDS),
            "sample": _seconds_per_step(sample_step, SAMPLE_SECONDS)}


def kernel_env(kset: KernelSet, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with the user variables replaced by ``kset``'s."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in USER_VARIABLES}
    env.update(kset.env)
    return env


def time_in_subprocess(kset: KernelSet, workload: Workload) -> dict[str, float]:
    """:func:`time_here` in a fresh process that runs ``kset`` (checked against torch's report)."""
    env = kernel_env(kset)
    env[SWITCH] = "off"
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "ncsn.app.cpu_kernels", "--time", workload.to_json()]
    try:
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise KernelChoiceError(f"timing {kset.label} took over {CHILD_TIMEOUT_S} s") from exc
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise KernelChoiceError(f"timing {kset.label} failed ({last})")
    record = json.loads(lines[-1])
    if record["capability"] != kset.capability:
        raise KernelChoiceError(f"asked torch for {kset.label} kernels, it ran {record['capability']}")
    return {"train": float(record["train"]), "sample": float(record["sample"])}
