"""CUDA graphs for every sampler: each level's update (``ncsn.samplers``) captured once and replayed."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch

from ncsn.samplers import Callback, SamplerPlan, ScoreFn, denoise_step, fill_noise, run_plan
from ncsn.samplers.plans import level_iter

log = logging.getLogger("ncsn")


# ---------------------------------------------------------------------------------------------- sampling
class _Buffers:
    """The static tensors every captured level update of one batch shape reads and writes: the sample, the
    level's noise, its coefficients and level index, and the plan's memory (DPM-Solver++ 2M's last estimate)."""

    def __init__(self, plan: SamplerPlan, x: torch.Tensor) -> None:
        self.x = x.detach().clone(memory_format=torch.contiguous_format)
        self.noise = torch.zeros((plan.draws, *x.shape), dtype=x.dtype, device=x.device)
        self.levels = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        self.coeffs = torch.zeros(plan.coeffs.shape[1], dtype=x.dtype, device=x.device)
        self.memory = torch.zeros((plan.memory, *x.shape), dtype=x.dtype, device=x.device) if plan.memory else None


class _LevelGraph:
    """The captured CUDA graph of one level update (``plan.update`` or ``plan.final_update``) over shared
    :class:`_Buffers`. ``capture=False`` runs the update eagerly at each :meth:`replay` (how the CPU tests
    check the replay loop of :func:`graphed_sample`)."""

    def __init__(self, update, score_fn: ScoreFn, buffers: _Buffers, *, capture: bool = True,
                 warmup: int = 2) -> None:
        self.update, self.score_fn, self.buffers = update, score_fn, buffers
        self.graph: torch.cuda.CUDAGraph | None = None
        if not capture:
            return
        b = buffers
        start = b.x.clone()
        memory = b.memory.clone() if b.memory is not None else None
        # Warm up on a side stream (lazy cuDNN/cuBLAS handles, autotuning, torch.compile), then capture.
        side = torch.cuda.Stream(device=b.x.device)
        side.wait_stream(torch.cuda.current_stream(b.x.device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._body()
        torch.cuda.current_stream(b.x.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: a DataLoader pin-memory thread calling CUDA meanwhile must not break the capture
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self._body()
        b.x.copy_(start)
        if memory is not None:
            b.memory.copy_(memory)

    def _body(self) -> None:
        b = self.buffers
        b.x.copy_(self.update(self.score_fn, b.x, b.levels, b.coeffs, b.noise, None, b.memory))

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
    graphs = None
    if cuda_graphs and _graph_capable(x) and callback is None:
        graphs = _get_graphs(plan, score_fn, x.contiguous(), cache, cache_token, capture=x.is_cuda)
    if graphs is None:
        return run_plan(plan, score_fn, x, sigmas, callback=callback, generator=generator, progress=progress)
    sigmas = sigmas.to(device=x.device, dtype=x.dtype)
    coeffs = plan.coeffs.to(device=x.device, dtype=x.dtype)
    buffers = graphs[plan.update].buffers
    buffers.x.copy_(x)
    if buffers.memory is not None:
        buffers.memory.zero_()
    for i in level_iter(plan.num_levels, progress, plan.title + " (CUDA graphs)"):
        buffers.levels.fill_(i)
        buffers.coeffs.copy_(coeffs[i])
        for t in range(plan.draws):
            fill_noise(buffers.noise[t], generator)
        graphs[plan.update_at(i)].replay()
    x = buffers.x.clone()
    return denoise_step(score_fn, x, sigmas) if plan.denoise else x


def _get_graphs(plan: SamplerPlan, score_fn: ScoreFn, x: torch.Tensor, cache: dict | None,
                cache_token: Any, capture: bool = True) -> dict | None:
    """One captured graph per distinct update of ``plan`` (``update``, ``final_update``), all over the same
    buffers (None if a capture failed: the caller then samples eagerly). ``capture=False``: the same buffers
    and replay loop with the updates run eagerly (off CUDA, for tests)."""
    shape_key = (tuple(x.shape), x.dtype, str(x.device), plan.draws, plan.coeffs.shape[1], plan.memory)
    if cache is not None and cache.get("token") != cache_token:
        cache.clear()
        cache["token"] = cache_token
    cache = {} if cache is None else cache
    buffers = cache.get(("buffers", *shape_key))
    if buffers is None:
        buffers = cache[("buffers", *shape_key)] = _Buffers(plan, x)
    graphs = {}
    for update in dict.fromkeys(u for u in (plan.update, plan.final_update) if u is not None):
        key = (update, id(score_fn), *shape_key)
        if key not in cache:
            try:
                cache[key] = _LevelGraph(update, score_fn, buffers, capture=capture)
            except Exception as exc:  # noqa: BLE001 - any capture failure: run the same steps eagerly instead
                warnings.warn(f"CUDA-graph capture of the {plan.title} steps failed ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); sampling without CUDA graphs",
                              RuntimeWarning, stacklevel=3)
                cache[key] = None
        if cache[key] is None:
            return None
        graphs[update] = cache[key]
    return graphs
