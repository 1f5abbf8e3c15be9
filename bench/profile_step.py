"""Where the time of one annealed-Langevin step goes: convolution kernels vs everything else (torch.profiler).

    python bench/profile_step.py                          # the paper's CIFAR-10 NCSN, batch 1,000 and 100, fast path
    python bench/profile_step.py --tiny                   # CPU smoke run (ngf 8, batch 4 and 8): CPU time
    python bench/profile_step.py --net cifar10_ncsnv2 --batches 1000 --json out.json

The step is ``x + α s(x, σ) + sqrt(2α) z`` (:func:`ncsn.samplers.ald_level`, the per-level update the fast
sampler captures in CUDA graphs) with the fast path's score function, as ``perf=fast`` runs it: bf16 autocast,
channels_last and the compiled network (``ScoreModel.score_fn`` with ``PerfSettings(enabled=True)``). It is
profiled launched one kernel at a time, without the CUDA graph: a graph replays the same kernels, so the GPU
time per kernel is the same, and the profiler sees every kernel by name.

For each batch: ``--warmup`` steps (compile, cuDNN autotuning), then ``--steps`` steps timed without the profiler
(wall ms/step) and ``--steps`` steps under ``torch.profiler``. On a GPU it sums the CUDA kernel time per step,
grouping kernel names that contain conv, gemm, cutlass, xmma or sm90 as "convolution" and the rest as "other"
(pointwise / reduction kernels of the norms and activations, layout copies, the Langevin update, memsets, ...),
and prints a table of the two groups and the top ``--top`` "other" kernels. On the CPU (``--tiny``) it groups the
operators' self CPU time the same way (``aten::mkldnn_convolution`` and friends are "convolution").
``GPU busy / wall`` near 100 % means the step is bound by the kernels themselves, far below it means launch
overhead (which the CUDA graphs of the real sampler remove).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from typing import Any

import torch
from speed import NETS, make_model, sync  # bench/ is the script's directory, so on sys.path

from ncsn.perf import PerfSettings
from ncsn.samplers import ald_level

CONV_PATTERN = re.compile(r"conv|gemm|cutlass|xmma|sm90", re.IGNORECASE)


def group_of(name: str) -> str:
    return "convolution" if CONV_PATTERN.search(name) else "other"


def kernel_times(prof: torch.profiler.profile, cuda: bool) -> dict[str, tuple[float, int]]:
    """``{name: (total microseconds, calls)}``: CUDA kernels (and memcpy/memset) on a GPU, operators' self CPU
    time on the CPU."""
    out: dict[str, tuple[float, int]] = {}
    if cuda:
        for evt in prof.events():
            if evt.device_type == torch.autograd.DeviceType.CUDA:
                us, n = out.get(evt.name, (0.0, 0))
                out[evt.name] = (us + evt.time_range.elapsed_us(), n + 1)
    else:
        for avg in prof.key_averages():
            if avg.self_cpu_time_total > 0:
                out[avg.key] = (float(avg.self_cpu_time_total), int(avg.count))
    return out


def breakdown(times: dict[str, tuple[float, int]], steps: int, top: int) -> dict[str, Any]:
    """Per-step milliseconds per group and the ``top`` largest non-convolution kernels."""
    groups = {"convolution": 0.0, "other": 0.0}
    for name, (us, _) in times.items():
        groups[group_of(name)] += us / 1000 / steps
    others = sorted(((name, us, n) for name, (us, n) in times.items() if group_of(name) == "other"),
                    key=lambda item: -item[1])[:top]
    return {"ms_per_step": groups, "total_ms_per_step": sum(groups.values()),
            "top_other": [{"name": name, "ms_per_step": us / 1000 / steps, "calls_per_step": n / steps}
                          for name, us, n in others]}


def profile_batch(spec_name: str, batch: int, ngf: int, perf: PerfSettings, device: torch.device, warmup: int,
                  steps: int, top: int) -> dict[str, Any]:
    spec = NETS[spec_name]
    torch.manual_seed(0)
    model = make_model(spec, spec.build(ngf), perf, device)
    model.eval()
    score = model.score_fn  # the fast network (compiled, bf16, channels_last) when perf is on
    level = 0
    alpha = (spec.step_lr * (model.sigmas[level] / model.sigmas[-1]) ** 2).to(device)
    levels = torch.full((batch,), level, dtype=torch.long, device=device)
    x = torch.rand(batch, *spec.shape, device=device)
    noise = torch.randn(1, batch, *spec.shape, device=device)

    def step() -> None:
        nonlocal x
        x = ald_level(score, x, levels, alpha.reshape(1), noise)

    with torch.no_grad():
        start = time.perf_counter()
        for _ in range(warmup):
            step()
        sync(device)
        warmup_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        wall_ms = (time.perf_counter() - start) * 1000 / steps
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(steps):
                step()
            sync(device)
    times = kernel_times(prof, device.type == "cuda")
    if not times:
        print(f"warning: the profiler recorded no {'CUDA kernel' if device.type == 'cuda' else 'operator'} "
              "times (CUPTI unavailable?)", file=sys.stderr)
    result = breakdown(times, steps, top)
    result.update({"net": spec_name, "ngf": ngf, "batch": batch, "device": str(device), "warmup_s": warmup_s,
                   "wall_ms_per_step": wall_ms, "timed_steps": steps, "perf": perf.describe(),
                   "time_kind": "CUDA kernel time" if device.type == "cuda" else "self CPU time"})
    return result


def print_result(r: dict[str, Any]) -> None:
    total = r["total_ms_per_step"] or float("nan")
    kind = r["time_kind"]
    print(f"## {r['net']} (ngf {r['ngf']}), batch {r['batch']}, one Langevin step, fast path {r['perf']}")
    print(f"warm-up {r['warmup_s']:.1f} s; wall {r['wall_ms_per_step']:.3f} ms/step (one kernel at a time, no CUDA "
          f"graph); {kind} {total:.3f} ms/step = {100 * total / r['wall_ms_per_step']:.0f} % of the wall time"
          + (" (GPU busy / wall)" if kind.startswith("CUDA") else ""))
    print()
    print(f"| group | {kind} ms/step | share |")
    print("|---|---:|---:|")
    for group, ms in r["ms_per_step"].items():
        print(f"| {group} | {ms:.3f} | {100 * ms / total:.1f}% |")
    print(f"| total | {total:.3f} | 100% |")
    print()
    print(f"top {len(r['top_other'])} non-convolution kernels:")
    print()
    print(f"| kernel | {kind} ms/step | calls/step | share of total |")
    print("|---|---:|---:|---:|")
    for k in r["top_other"]:
        name = k["name"] if len(k["name"]) <= 100 else k["name"][:97] + "..."
        print(f"| `{name}` | {k['ms_per_step']:.3f} | {k['calls_per_step']:.0f} | "
              f"{100 * k['ms_per_step'] / total:.1f}% |")
    print(flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: ngf 8, batches 4 and 8, compile off")
    p.add_argument("--net", default="cifar10", choices=sorted(NETS))
    p.add_argument("--batches", default=None, help="comma list (default 1000,100; tiny: 4,8)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; tiny: 1)")
    p.add_argument("--steps", type=int, default=None, help="steps timed and profiled (default 5; tiny: 2)")
    p.add_argument("--top", type=int, default=15, help="how many non-convolution kernels to list")
    p.add_argument("--compile", dest="compile", action="store_true", default=None, help="torch.compile on")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="torch.compile off")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (tiny default: 1)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    threads = args.threads if args.threads is not None else (1 if args.tiny and device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    batches = [int(b) for b in (args.batches or ("4,8" if args.tiny else "1000,100")).split(",")]
    ngf = 8 if args.tiny else NETS[args.net].ngf
    use_compile = args.compile if args.compile is not None else not args.tiny
    perf = PerfSettings(enabled=True, compile=use_compile).resolve(device)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    steps = args.steps if args.steps is not None else (2 if args.tiny else 5)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# profile of one Langevin step{' (--tiny: CPU smoke sizes)' if args.tiny else ''}")
    print(f"device: {device} ({device_name}); torch {torch.__version__}; threads {torch.get_num_threads()}")
    print()
    results = []
    for batch in batches:
        results.append(profile_batch(args.net, batch, ngf, perf, device, warmup, steps, args.top))
        print_result(results[-1])
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device_name": device_name, "torch": torch.__version__, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
