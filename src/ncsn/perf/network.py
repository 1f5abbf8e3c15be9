"""The fast network: bf16 autocast with fp32 norms, channels_last, torch.compile and its cache, fused optimizer
kwargs, the sync-free non-finite check, and the per-module runtime that holds them."""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import types
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ncsn.nets.normalization import ConditionalInstanceNorm2dPlus, InstanceNorm2dPlus

log = logging.getLogger("ncsn")
from ncsn.perf.settings import PerfSettings


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
    for key, module, name, env in (("fx_graph_cache", inductor_config, "fx_graph_cache",
                                    "TORCHINDUCTOR_FX_GRAPH_CACHE"),
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
    contiguous fp32 output. Carries ``divide_by_sigma`` and ``noise_input`` so :func:`ncsn.nets.score_function`
    accepts it."""

    def __init__(self, net: nn.Module, settings: PerfSettings, device: torch.device | str) -> None:
        self.net = net
        self.settings = settings
        self.device_type = torch.device(device).type
        self.divide_by_sigma = bool(getattr(net, "divide_by_sigma", False))
        self.noise_input = getattr(net, "noise_input", "level")
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
