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
    for i in level_iter(plan.num_levels, progress, plan.title + " (CUDA graphs)"):
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

