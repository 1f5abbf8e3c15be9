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

Modules: ``settings`` (``PerfSettings``, ``resolve``), ``network`` (the fast forward, fp32 norms, compile cache,
optimizer kwargs, non-finite watch, per-module runtime), ``graphs`` (``graphed_sample``).
"""

from ncsn.perf.graphs import graphed_sample
from ncsn.perf.network import (
    NORM_TYPES,
    FastForward,
    NonFiniteWatch,
    PerfRuntime,
    apply_backend_flags,
    autocast_context,
    default_compile_cache_dir,
    enable_compile_cache,
    fp32_norms,
    optimizer_kwargs,
    parameter_token,
    prepare_net,
)
from ncsn.perf.settings import OFF, PerfSettings, resolve

__all__ = [
    "NORM_TYPES", "OFF", "FastForward", "NonFiniteWatch", "PerfRuntime", "PerfSettings", "apply_backend_flags",
    "autocast_context", "default_compile_cache_dir", "enable_compile_cache", "fp32_norms", "graphed_sample",
    "optimizer_kwargs", "parameter_token", "prepare_net", "resolve",
]
