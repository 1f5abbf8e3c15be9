"""The fast path's switches (``PerfSettings``) and what they mean on a device."""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Mapping
from typing import Any

import torch

from ncsn.errors import ConfigError

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

