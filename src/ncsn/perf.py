"""Fast training and sampling behind one switch (``perf=fast`` / ``perf=off``; ``perf=auto`` is the default).

The reference way of running NCSN (the official code) is fp32, eager PyTorch, one small kernel at a time,
and for sampling a Python loop of 1,000 Langevin steps. This module holds everything that makes it fast on a
GPU, as plain functions and small classes over a score network (no Lightning, no Hydra):

* **bf16 autocast** for the network only. The normalisation statistics of InstanceNorm++ (the channel means
  and their variance, whose differences would cancel catastrophically in bf16) and the instance norm itself
  run in fp32 (:func:`fp32_norms`, applied in place without touching the parameters); the network output is
  cast back to fp32, so the DSM loss (``ncsn.losses``) and the Langevin state ``x`` stay fp32.
* **channels_last** weights and inputs (NHWC convolutions on tensor cores).
* **torch.compile** of the score network's forward (``dynamic=False``: fixed shapes, one specialisation
  per batch size), with inductor's on-disk caches on (:func:`enable_compile_cache`): a second identical run
  reuses the compiled kernels instead of compiling again.
* **fused Adam** (``fused=True``) when the optimizer factory accepts it and the parameters are on CUDA.
* **CUDA graphs for sampling** (:func:`graphed_sample`): each sampler's per-level update (ald, pc, cas) is
  captured once (static ``x``, level, coefficient and noise buffers) and replayed, so the 1,000 steps of the
  paper's sampler cost L graph launches and no host synchronisation. The noise is drawn outside the graph, one
  ``normal_`` per step from the caller's generator into the static buffer: the samples equal those of
  :func:`ncsn.samplers.run_plan` given the same generator and network.

``PerfSettings.enabled = "auto"`` turns the fast path on when the model runs on a CUDA device and off
otherwise. Off means exactly the code paths of ``ncsn.samplers`` / ``ncsn.losses`` with the plain network.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import os
import types
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ncsn.errors import ConfigError
from ncsn.nets.normalization import ConditionalInstanceNorm2dPlus, InstanceNorm2dPlus
from ncsn.samplers import Callback, SamplerPlan, ScoreFn, _level_iter, denoise_step, fill_noise, run_plan

log = logging.getLogger("ncsn")

_ENABLED_WORDS = {"auto": "auto", "on": True, "fast": True, "true": True, "off": False, "false": False}


# ---------------------------------------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class PerfSettings:
    """The fast-path switches. ``enabled``: ``"auto"`` (on for CUDA, off otherwise), True or False.

    The other fields say what "on" means; :meth:`resolve` turns the settings into the ones that apply on a
    device (everything False when off; CUDA-only features False elsewhere).

    Attributes:
        bf16: run the network under bf16 autocast (norm statistics, loss and Langevin state stay fp32).
        channels_last: channels_last weights and inputs for 4-D (image) networks.
        compile: ``torch.compile`` the network forward (not with the ``ssm`` loss: no double backward).
        compile_mode: torch.compile mode (``default``, ``max-autotune-no-cudagraphs``, ...).
            ``reduce-overhead`` brings inductor's own CUDA graphs and turns ``cuda_graphs`` off.
        compile_backend: torch.compile backend (``inductor``; ``aot_eager``/``eager`` to debug).
        cuda_graphs: capture each level's sampler steps in a CUDA graph (CUDA only).
        fused_optimizer: pass ``fused=True`` to the optimizer (CUDA only, Adam/AdamW/SGD/...).
        cudnn_benchmark: set ``torch.backends.cudnn.benchmark`` (fixed shapes; CUDA only).
    """

    enabled: bool | str = "auto"
    bf16: bool = True
    channels_last: bool = True
    compile: bool = True
    compile_mode: str = "default"
    compile_backend: str = "inductor"
    cuda_graphs: bool = True
    fused_optimizer: bool = True
    cudnn_benchmark: bool = True

    def __post_init__(self) -> None:
        enabled = self.enabled
        if isinstance(enabled, str):
            word = enabled.strip().lower()
            if word not in _ENABLED_WORDS:
                raise ConfigError(f"perf.enabled must be auto, true or false (got '{enabled}')")
            enabled = _ENABLED_WORDS[word]
        elif not isinstance(enabled, bool):
            raise ConfigError(f"perf.enabled must be auto, true or false (got {enabled!r})")
        object.__setattr__(self, "enabled", enabled)

    @classmethod
    def from_config(cls, cfg: PerfSettings | Mapping[str, Any] | bool | str | None) -> PerfSettings:
        """Settings from a config mapping (``conf/perf/*.yaml``), a bool/word for ``enabled``, or None (off)."""
        if isinstance(cfg, PerfSettings):
            return cfg
        if cfg is None:
            return cls(enabled=False)
        if isinstance(cfg, (bool, str)):
            return cls(enabled=cfg)
        data = dict(cfg)
        # checkpoints written before one graph per level stored how many Langevin steps each graph held
        data.pop("steps_per_graph", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown perf setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)

    def is_on(self, device: torch.device | str) -> bool:
        device = torch.device(device)
        return device.type == "cuda" if self.enabled == "auto" else bool(self.enabled)

    def resolve(self, device: torch.device | str) -> PerfSettings:
        """The settings that apply on ``device``: ``enabled`` True/False, features masked accordingly."""
        return _resolve(self, torch.device(device))

    def _resolve(self, device: torch.device) -> PerfSettings:
        if not self.is_on(device):
            return OFF
        cuda = device.type == "cuda"
        bf16 = self.bf16
        if bf16 and cuda and torch.cuda.is_available():
            bf16 = _cuda_bf16_supported(device)
        inductor_graphs = self.compile and self.compile_mode == "reduce-overhead"
        return dataclasses.replace(
            self,
            enabled=True,
            bf16=bf16,
            cuda_graphs=self.cuda_graphs and cuda and not inductor_graphs,
            fused_optimizer=self.fused_optimizer and cuda,
            cudnn_benchmark=self.cudnn_benchmark and cuda,
        )

    def describe(self) -> str:
        if self.enabled is not True:
            return "off" if self.enabled is False else "auto"
        parts = [name for name in ("bf16", "channels_last") if getattr(self, name)]
        if self.compile:
            parts.append(f"compile[{self.compile_backend}/{self.compile_mode}]")
        if self.cuda_graphs:
            parts.append("cuda_graphs[one per level]")
        if self.fused_optimizer:
            parts.append("fused optimizer")
        if self.cudnn_benchmark:
            parts.append("cudnn.benchmark")
        return "on (" + ", ".join(parts or ["no feature"]) + ")"


@functools.lru_cache(maxsize=64)
def _resolve(settings: PerfSettings, device: torch.device) -> PerfSettings:
    return settings._resolve(device)


OFF = PerfSettings(enabled=False, bf16=False, channels_last=False, compile=False, cuda_graphs=False,
                   fused_optimizer=False, cudnn_benchmark=False)


def _cuda_bf16_supported(device: torch.device) -> bool:
    try:
        with torch.cuda.device(device):
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # older signature
        return bool(torch.cuda.is_bf16_supported())


def resolve(cfg: PerfSettings | Mapping[str, Any] | bool | str | None, device: torch.device | str) -> PerfSettings:
    """Shortcut: ``PerfSettings.from_config(cfg).resolve(device)``."""
    return PerfSettings.from_config(cfg).resolve(device)


# ---------------------------------------------------------------------------------------------- the network
def autocast_context(settings: PerfSettings, device: torch.device | str):
    """bf16 autocast when ``settings.bf16`` (weight-cast cache off: safe under CUDA-graph capture)."""
    device = torch.device(device)
    if not settings.bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)


NORM_TYPES: tuple[type[nn.Module], ...] = (
    ConditionalInstanceNorm2dPlus,
    InstanceNorm2dPlus,
    nn.modules.instancenorm._InstanceNorm,
    nn.modules.batchnorm._BatchNorm,
)


def _fp32_norm_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The module's own forward with a float32 input and autocast off; a channels_last input gives a
    channels_last output (``F.instance_norm`` returns NCHW whatever its input). A no-op for an NCHW fp32
    input without autocast.

    Keeping the layout matters beyond speed: a contiguous activation meeting a channels_last conv weight
    makes the compiled backward's predicted gradient strides differ from the real ones ("view size is not
    compatible with input tensor's size and stride" from AOTAutograd)."""
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    with torch.autocast(x.device.type, enabled=False):
        out = type(self).forward(self, x, *args, **kwargs)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def fp32_norms(net: nn.Module, types_: tuple[type[nn.Module], ...] = NORM_TYPES) -> int:
    """Make every normalisation layer of ``net`` compute in fp32 under autocast, in place.

    Under bf16 autocast the convolutions hand bf16 activations to the norms; InstanceNorm++ then takes
    channel means, their mean and variance and the difference ``mu_c - m`` in bf16 (8 significant bits),
    which can cancel to nothing. This routes each norm's forward through :func:`_fp32_norm_forward`
    (input cast to fp32, autocast off inside, channels_last in -> channels_last out). Parameters, buffers and
    state-dict keys are untouched, and for an NCHW fp32 input without autocast the result is bit-for-bit the
    original one. Idempotent; returns how many layers were patched.
    """
    count = 0
    for module in net.modules():
        if isinstance(module, types_) and not getattr(module, "_ncsn_fp32_norm", False):
            module.forward = types.MethodType(_fp32_norm_forward, module)
            module._ncsn_fp32_norm = True
            count += 1
    return count


def prepare_net(net: nn.Module, settings: PerfSettings) -> nn.Module:
    """The in-place part of the fast path: channels_last weights; norms in fp32 that keep the layout.

    Parameter names, shapes and values are unchanged (checkpoints stay interchangeable); the Parameter
    objects are kept, so an optimizer built before or after sees the same tensors. Returns ``net``.
    """
    if settings.channels_last:
        net.to(memory_format=torch.channels_last)  # only 4-D tensors change layout
    if settings.bf16 or settings.channels_last:
        fp32_norms(net)
    return net


def default_compile_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/ncsn/inductor`` (``~/.cache/ncsn/inductor`` when XDG_CACHE_HOME is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ncsn" / "inductor"


def _user_inductor_cache_dir() -> str | None:
    """``TORCHINDUCTOR_CACHE_DIR`` unless unset, empty or torch's own default (which torch sets itself)."""
    value = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not value:
        return None
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # another torch layout: take any value as the user's
        return value
    return None if os.path.abspath(value) == os.path.abspath(default_cache_dir()) else value


def enable_compile_cache(cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Turn on inductor's persistent caches so that a second identical run reuses the compiled kernels.

    * ``torch._inductor.config.fx_graph_cache`` (compiled FX graphs, with their Triton kernels) and
      ``torch._functorch.config.enable_autograd_cache`` (AOTAutograd's forward/backward split) are set to True
      where this torch has them, unless the user chose otherwise with ``TORCHINDUCTOR_FX_GRAPH_CACHE`` /
      ``TORCHINDUCTOR_AUTOGRAD_CACHE`` (torch reads those itself).
    * ``TORCHINDUCTOR_CACHE_DIR`` (where both caches and the Triton kernels live), unless the user set it, is
      pointed at ``cache_dir`` (default :func:`default_compile_cache_dir`), created if missing. torch's own
      default is ``/tmp/torchinductor_$USER``, which many machines empty on reboot; importing
      ``torch._inductor.config`` writes that default into the environment, so a value equal to it counts as
      not set by the user. Any other value is kept.

    Call it before the first compile of the process (torch reads the directory when it compiles). Idempotent;
    returns what applies: ``{"cache_dir", "fx_graph_cache", "autograd_cache"}`` (None where torch lacks it).
    """
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    if not _user_inductor_cache_dir():
        path = Path(cache_dir) if cache_dir is not None else default_compile_cache_dir()
        try:
            path.mkdir(parents=True, exist_ok=True)
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path.resolve())
        except OSError as exc:  # read-only home and the like: keep torch's default
            log.warning("perf: cannot create the compile cache dir %s (%s); using torch's default", path, exc)
    settings: dict[str, Any] = {"cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR")}
    for key, module, name, env in (("fx_graph_cache", inductor_config, "fx_graph_cache", "TORCHINDUCTOR_FX_GRAPH_CACHE"),
                                   ("autograd_cache", functorch_config, "enable_autograd_cache",
                                    "TORCHINDUCTOR_AUTOGRAD_CACHE")):
        if not hasattr(module, name):
            settings[key] = None
            continue
        if os.environ.get(env) is None:
            setattr(module, name, True)
        settings[key] = bool(getattr(module, name))
    return settings


def _raise_recompile_limit(limit: int = 64) -> None:
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name) and getattr(dynamo_config, name) < limit:
            setattr(dynamo_config, name, limit)


class FastForward:
    """``net(x, levels)`` the fast way: channels_last input, bf16 autocast, optionally compiled; returns a
    contiguous fp32 output. Carries ``divide_by_sigma`` so :func:`ncsn.nets.score_function` accepts it."""

    def __init__(self, net: nn.Module, settings: PerfSettings, device: torch.device | str) -> None:
        self.net = net
        self.settings = settings
        self.device_type = torch.device(device).type
        self.divide_by_sigma = bool(getattr(net, "divide_by_sigma", False))
        if settings.compile:
            _raise_recompile_limit()
            if settings.compile_backend == "inductor":
                enable_compile_cache()
            kwargs: dict[str, Any] = {"dynamic": False, "backend": settings.compile_backend}
            if settings.compile_backend == "inductor":
                kwargs["mode"] = settings.compile_mode
            self._call: Callable[..., torch.Tensor] = torch.compile(self._forward, **kwargs)
        else:
            self._call = self._forward

    def _forward(self, x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        if self.settings.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_context(self.settings, self.device_type):
            out = self.net(x, levels)
        return out.to(torch.float32, memory_format=torch.contiguous_format)

    def __call__(self, x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        return self._call(x, levels)


def apply_backend_flags(settings: PerfSettings) -> None:
    """Process-wide switches of the fast path (only ``cudnn.benchmark`` today: shapes are fixed)."""
    if settings.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True


# ---------------------------------------------------------------------------------------------- optimizer
def optimizer_kwargs(factory: Callable[..., Any], settings: PerfSettings, params: Iterable[torch.Tensor]) -> dict:
    """``{"fused": True}`` when asked for, the parameters are all CUDA tensors and ``factory`` is a
    ``functools.partial`` (Hydra ``_partial_: true``) of an optimizer class with a ``fused`` argument."""
    if not settings.fused_optimizer or not isinstance(factory, functools.partial) or "fused" in factory.keywords:
        return {}
    target = factory.func
    if not (inspect.isclass(target) and issubclass(target, torch.optim.Optimizer)):
        return {}
    try:
        accepts = "fused" in inspect.signature(target).parameters
    except (TypeError, ValueError):
        return {}
    params = list(params)
    if not accepts or not params or not all(p.is_cuda and p.is_floating_point() for p in params):
        return {}
    return {"fused": True}


# ---------------------------------------------------------------------------------------------- training guard
class NonFiniteWatch:
    """Checks that training losses are finite without stalling the GPU.

    ``record(loss)`` (right after the forward, before ``backward`` is queued) starts an asynchronous copy of
    ``isfinite(loss)`` into pinned host memory and records a CUDA event; ``first_bad()`` (before the optimizer
    step) waits for those events only, i.e. for the forward passes, while the backward already queued keeps
    the GPU busy. A non-finite loss is therefore still caught before the optimizer applies it.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[torch.Tensor, Any, torch.Tensor]] = []

    def record(self, loss: torch.Tensor) -> None:
        loss = loss.detach()
        flag = torch.empty((), dtype=torch.bool, pin_memory=True)
        flag.copy_(torch.isfinite(loss), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append((flag, event, loss))

    def first_bad(self) -> torch.Tensor | None:
        """The first recorded non-finite loss since the last call (None when all were finite)."""
        pending, self._pending = self._pending, []
        for flag, event, loss in pending:
            event.synchronize()
            if not bool(flag):
                return loss
        return None


# ---------------------------------------------------------------------------------------------- sampling
class _LevelGraph:
    """Static buffers and the captured CUDA graph of one sampler's per-level update (``plan.update``) for one
    batch shape. ``capture=False`` keeps the buffers and runs the update eagerly at each :meth:`replay` (how
    the CPU tests check the replay loop of :func:`graphed_sample`)."""

    def __init__(self, plan: SamplerPlan, score_fn: ScoreFn, x: torch.Tensor, *, capture: bool = True,
                 warmup: int = 2) -> None:
        self.update, self.score_fn = plan.update, score_fn
        self.x = x.detach().clone(memory_format=torch.contiguous_format)
        self.noise = torch.zeros((plan.draws, *x.shape), dtype=x.dtype, device=x.device)
        self.levels = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        self.coeffs = torch.zeros(plan.coeffs.shape[1], dtype=x.dtype, device=x.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        if not capture:
            return
        start = self.x.clone()
        # Warm up on a side stream (lazy cuDNN/cuBLAS handles, autotuning, torch.compile), then capture.
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._body()
        torch.cuda.current_stream(x.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: a DataLoader pin-memory thread calling CUDA meanwhile must not break the capture
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self._body()
        self.x.copy_(start)

    def _body(self) -> None:
        self.x.copy_(self.update(self.score_fn, self.x, self.levels, self.coeffs, self.noise))

    def replay(self) -> None:
        if self.graph is None:
            self._body()
        else:
            self.graph.replay()


def _graph_capable(x: torch.Tensor) -> bool:
    return x.is_cuda


def graphed_sample(
    plan: SamplerPlan,
    score_fn: ScoreFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    cuda_graphs: bool = True,
    cache: dict | None = None,
    cache_token: Any = None,
) -> torch.Tensor:
    """Any sampler's plan (``ncsn.samplers.build_plan``: ald, pc, cas) with each level's update replayed from
    one CUDA graph: no host synchronisation and one launch per level instead of a Python round trip per
    kernel. The graph captures ``plan.update``, the very function :func:`ncsn.samplers.run_plan` calls; the
    level's noise is drawn outside it, one ``normal_`` per step from ``generator`` into the static buffer in
    the eager order, so given the same generator state the samples equal the eager sampler's. ``score_fn``
    must not consume the same generator (the networks here use none).

    Off CUDA, without ``cuda_graphs``, with a ``callback`` (which needs every step's ``x``) or when the capture
    fails, it is :func:`ncsn.samplers.run_plan` itself.

    ``cache`` (a dict owned by the caller) keeps the captured graphs between calls with the same batch shape;
    ``cache_token`` (e.g. the parameters' data pointers) invalidates it when it changes. Graphs read the
    network's parameters in place, so in-place updates (optimizer steps, ``load_state_dict``) are seen.
    """
    graph = None
    if cuda_graphs and _graph_capable(x) and callback is None:
        graph = _get_graph(plan, score_fn, x.contiguous(), cache, cache_token)
    if graph is None:
        return run_plan(plan, score_fn, x, sigmas, callback=callback, generator=generator, progress=progress)
    sigmas = sigmas.to(device=x.device, dtype=x.dtype)
    coeffs = plan.coeffs.to(device=x.device, dtype=x.dtype)
    graph.x.copy_(x)
    for i in _level_iter(plan.num_levels, progress, plan.title + " (CUDA graphs)"):
        graph.levels.fill_(i)
        graph.coeffs.copy_(coeffs[i])
        for t in range(plan.draws):
            fill_noise(graph.noise[t], generator)
        graph.replay()
    x = graph.x.clone()
    return denoise_step(score_fn, x, sigmas) if plan.denoise else x


def _get_graph(plan: SamplerPlan, score_fn: ScoreFn, x: torch.Tensor, cache: dict | None,
               cache_token: Any) -> _LevelGraph | None:
    key = (plan.update, id(score_fn), tuple(x.shape), x.dtype, str(x.device), plan.draws, plan.coeffs.shape[1])
    if cache is not None:
        if cache.get("token") != cache_token:
            cache.clear()
            cache["token"] = cache_token
        if key in cache:
            return cache[key]
    try:
        graph: _LevelGraph | None = _LevelGraph(plan, score_fn, x)
    except Exception as exc:  # noqa: BLE001 - any capture failure: run the same steps eagerly instead
        warnings.warn(f"CUDA-graph capture of the {plan.title} steps failed ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0] if str(exc) else ''}); sampling without CUDA graphs",
                      RuntimeWarning, stacklevel=3)
        graph = None
    if cache is not None:
        cache[key] = graph
    return graph


# ---------------------------------------------------------------------------------------------- per-module state
class PerfRuntime:
    """What a module builds lazily for the fast path: the prepared network's fast forward, the score
    function, captured graphs and the non-finite watch. Never copied: ``deepcopy`` (e.g. Lightning's EMA
    callback) and pickling give a fresh, empty runtime, which rebuilds on first use."""

    def __init__(self) -> None:
        self.forwards: dict[tuple, FastForward] = {}
        self.graph_cache: dict = {}
        self.score_fns: dict = {}
        self.watch = NonFiniteWatch()
        self.announced: set = set()

    def __deepcopy__(self, memo: dict) -> PerfRuntime:
        return PerfRuntime()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def forward_for(self, net: nn.Module, settings: PerfSettings, device: torch.device | str) -> FastForward | None:
        """The fast forward of ``net`` for resolved ``settings`` on ``device`` (None when off); prepares the
        network in place the first time."""
        if settings.enabled is not True:
            return None
        device = torch.device(device)
        key = (id(net), settings, device.type)
        fast = self.forwards.get(key)
        if fast is None:
            prepare_net(net, settings)
            apply_backend_flags(settings)
            fast = FastForward(net, settings, device)
            self.forwards[key] = fast
            if key not in self.announced:
                self.announced.add(key)
                log.info("perf: fast path %s on %s", settings.describe(), device)
        return fast


def parameter_token(module: nn.Module) -> tuple:
    """Identity of a module's parameter and buffer storage (changes when they are re-allocated, e.g. ``.to``)."""
    return tuple(t.data_ptr() for t in (*module.parameters(), *module.buffers()))
