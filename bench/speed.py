"""Speed and memory of training and sampling: the official code's way of running vs our fast path.

    python bench/speed.py                      # all three networks below (needs a GPU to be useful)
    python bench/speed.py --tiny               # CPU smoke run at tiny sizes (CI: ``make bench-cpu``)
    python bench/speed.py --json out.json --peak-tflops 989 --nets cifar10_ncsnv2 --tasks sample

Networks (``--nets``, default all three; each with its own official sampler, see ``NETS``):

* ``cifar10``: the paper's CIFAR-10 NCSN (RefineNet with CondInstanceNorm++, ngf 128, 3x32x32), σ 1 → 0.01,
  L = 10, T = 100, step_lr 2e-5: 1,000 network evaluations per image;
* ``mnist``: the paper's MNIST NCSN (ngf 64, 1x28x28), same sampler: 1,000 evaluations per image;
* ``cifar10_ncsnv2``: the NCSNv2 CIFAR-10 network (``ncsn.nets.NCSNv2``, ngf 128) with the official NCSNv2
  CIFAR-10 sampler: σ 50 → 0.01 geometric, L = 232, T = 5, step_lr 6.2e-6 and the final denoising step:
  232 x 5 + 1 = 1,161 evaluations per image, score = net(x)/σ.

For each network it measures (``--tasks``, default both)

* ``train``: training images/s at batch 128 (one DSM step: forward, loss, backward, Adam step; synthetic
  batches already on the device, so data loading is not part of it);
* ``sample``: annealed-Langevin sampling images/s at batch 100 and 1,000 (the NCSNv2 network: 1,000 only).
  We time about ``--sample-steps`` Langevin steps (default 50) after a warm-up call and extrapolate linearly
  to the network's evaluations per image. The timed steps keep the sampler's shape: the paper networks run
  5 steps at each of their 10 levels; the NCSNv2 network its own T = 5 steps at 10 levels spread evenly over
  its 232 (first and last included, so the step sizes are the real ones), plus its denoising step: 51
  timed evaluations, extrapolated to 1,161. Which levels run does not change the cost of a step;

for two ways of running the same network:

* **baseline**: the official code (ermongroup/ncsn): fp32, eager, the Python loop of ``anneal_Langevin_dynamics``
  (labels per level, a fresh ``randn_like`` per step, ``x = x + step_size * grad + noise``), ``loss.item()``
  every training step (the official loop logs it), Adam with PyTorch's default implementation,
  for the NCSNv2 network the same loop as ermongroup/ncsnv2 runs it (grad = net(x)/σ, the network divides by
  σ inside, and the final ``x + σ_L² grad`` denoising step; its per-step norm statistics are left out),
  ``cudnn.benchmark = True`` (the official ``main.py`` sets it) and TF32 convolutions as PyTorch allows by
  default;
* **fast**: ``ncsn.perf`` as ``perf=fast`` runs it: ``ScoreModel.compute_loss`` / ``ScoreModel.sample`` with
  bf16 autocast, channels_last, torch.compile, fused Adam and CUDA-graph sampling. Compile and graph-capture
  time is excluded from the rates and reported as the fast path's warm-up seconds.

It prints a markdown table, one ``ratio`` line per measurement (fast / baseline), peak memory
(``torch.cuda.max_memory_allocated`` per measurement on a GPU; the process's peak RSS so far on the CPU) and
MFU: model FLOPs (``torch.utils.flop_counter.FlopCounterMode``: one forward for sampling, forward + backward
for training) times the measured rate, over ``--peak-tflops`` (default 989: H100 SXM dense bf16; both paths
are compared against the same bf16 peak).

``--tiny`` (CPU): ngf 8, training batch 4, sampling batches 4 and 8, 10 sampling steps (the NCSNv2 network:
5 steps at 2 of its levels + the denoising step, still extrapolated to 1,161), compile off unless
``--compile``; it checks that the script and both paths run, its numbers say nothing about a GPU.

``--json`` is rewritten after every measured row, so a run cut short (``timeout``) keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import gc
import json
import math
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from ncsn.app.module import ScoreModel
from ncsn.nets import NCSN, NCSNv2, score_function
from ncsn.perf import PerfSettings
from ncsn.sigmas import geometric_sigmas


@dataclasses.dataclass(frozen=True)
class NetSpec:
    """A benchmarked network and its official sampler (geometric σ, ``n_steps_each`` = T per level)."""

    net_class: type[torch.nn.Module]
    channels: int
    size: int
    ngf: int
    sigma_max: float = 1.0
    sigma_min: float = 0.01
    num_scales: int = 10  # L
    n_steps_each: int = 100  # T
    step_lr: float = 2e-5
    denoise: bool = False  # NCSNv2's final x + σ_L² s(x, σ_L): one more evaluation per image
    sample_batches: tuple[int, ...] = (100, 1000)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)

    @property
    def evals_per_image(self) -> int:
        """Network evaluations of one sample: L x T (+ 1 for the denoising step)."""
        return self.num_scales * self.n_steps_each + int(self.denoise)

    def sigmas(self) -> torch.Tensor:
        return geometric_sigmas(self.sigma_max, self.sigma_min, self.num_scales)

    def build(self, ngf: int | None = None) -> torch.nn.Module:
        return self.net_class(in_channels=self.channels, image_size=self.size, ngf=ngf or self.ngf,
                              num_scales=self.num_scales)

    def timed_schedule(self, steps: int) -> tuple[torch.Tensor, int]:
        """The σ levels and steps per level timed for about ``steps`` Langevin steps: ``steps // L`` per level
        at every level when that is >= 1 (at most T), else T per level (at most ``steps``) at
        ``steps // T`` levels spread evenly over the schedule, the first and the last included."""
        L, T = self.num_scales, self.n_steps_each
        per_level = min(T, steps // L) if steps >= L else min(T, max(1, steps))
        levels = min(L, max(1, steps // per_level))
        index = torch.linspace(0, L - 1, levels).round().long().unique()
        return self.sigmas()[index], per_level


NETS = {
    # the paper's networks (NCSN, Song & Ermon 2019): L = 10, T = 100, step_lr 2e-5, no denoising step
    "cifar10": NetSpec(NCSN, 3, 32, 128),
    "mnist": NetSpec(NCSN, 1, 28, 64),
    # NCSNv2 (Song & Ermon 2020), the official CIFAR-10 config: 232 x 5 + 1 = 1,161 evaluations per image
    "cifar10_ncsnv2": NetSpec(NCSNv2, 3, 32, 128, sigma_max=50.0, sigma_min=0.01, num_scales=232, n_steps_each=5,
                              step_lr=6.2e-6, denoise=True, sample_batches=(1000,)),
}
TASKS = ("train", "sample")


# ---------------------------------------------------------------------------------------------- helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux: the process's peak so far
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Seconds for ``repeats`` calls of ``fn`` (synchronised before and after)."""
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- FLOPs
def flops_per_image(net: torch.nn.Module, shape: tuple[int, ...], device: torch.device, train: bool,
                    batch: int = 2) -> float:
    """Model FLOPs of one image: a forward (sampling) or forward + backward of the DSM loss (training)."""
    from torch.utils.flop_counter import FlopCounterMode

    net = copy.deepcopy(net).to(device)
    x = torch.rand(batch, *shape, device=device)
    levels = torch.zeros(batch, dtype=torch.long, device=device)
    with FlopCounterMode(display=False) as counter:
        if train:
            net(x, levels).square().sum().backward()
        else:
            with torch.no_grad():
                net(x, levels)
    return counter.get_total_flops() / batch


# ---------------------------------------------------------------------------------------------- baseline
@torch.no_grad()
def official_annealed_langevin(scorenet: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x_mod: torch.Tensor,
                               sigmas: list[float], n_steps_each: int, step_lr: float,
                               denoise: bool = False) -> torch.Tensor:
    """``anneal_Langevin_dynamics`` of the official code (minus the per-step copy of every intermediate
    sample to the CPU, which only serves the trajectory figures). ``scorenet(x, labels)`` is the score: the
    NCSN network itself, or for NCSNv2 net(x)/σ (the official NCSNv2 network divides inside its forward).
    ``denoise``: ermongroup/ncsnv2's final step ``x + σ_L² scorenet(x, L - 1)``."""
    for c, sigma in enumerate(sigmas):
        labels = torch.ones(x_mod.shape[0], device=x_mod.device) * c
        labels = labels.long()
        step_size = step_lr * (sigma / sigmas[-1]) ** 2
        for _ in range(n_steps_each):
            noise = torch.randn_like(x_mod) * math.sqrt(step_size * 2)
            grad = scorenet(x_mod, labels)
            x_mod = x_mod + step_size * grad + noise
    if denoise:
        last_noise = ((len(sigmas) - 1) * torch.ones(x_mod.shape[0], device=x_mod.device)).long()
        x_mod = x_mod + sigmas[-1] ** 2 * scorenet(x_mod, last_noise)
    return x_mod


# ---------------------------------------------------------------------------------------------- measurements
def make_model(spec: NetSpec, net: torch.nn.Module, perf: PerfSettings | None, device: torch.device,
               sigmas: torch.Tensor | None = None) -> ScoreModel:
    """A ScoreModel of a copy of ``net`` with the spec's sampler; ``sigmas`` defaults to the spec's schedule."""
    model = ScoreModel(copy.deepcopy(net), spec.sigmas() if sigmas is None else sigmas, list(spec.shape),
                       sampler={"n_steps_each": spec.n_steps_each, "step_lr": spec.step_lr,
                                "denoise": spec.denoise}, perf=perf)
    return model.to(device)


def bench_train(model: ScoreModel, shape: tuple[int, ...], batch: int, steps: int, warmup: int,
                device: torch.device, baseline: bool) -> dict:
    model.train()
    x = torch.rand(batch, *shape, device=device)
    optimizer = model.configure_optimizers()

    def step() -> None:
        out = model.compute_loss(x)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        if baseline:
            out.loss.item()  # the official training loop logs loss.item() every step

    reset_memory(device)
    warm = timed(step, device, warmup)
    seconds = timed(step, device, steps)
    return {"images_per_s": batch * steps / seconds, "warmup_s": warm, "peak_mib": peak_memory_mib(device),
            "fused_optimizer": bool(optimizer.defaults.get("fused"))}


def bench_sample(model: ScoreModel, spec: NetSpec, batch: int, per_level: int, device: torch.device,
                 baseline: bool) -> dict:
    """Time one sampling run over the model's σ levels (the timed subset of ``spec``'s schedule, see
    ``NetSpec.timed_schedule``), ``per_level`` steps each (+ the denoising step), after a warm-up run, and
    extrapolate to ``spec.evals_per_image`` evaluations per image."""
    model.eval()
    n_steps = per_level * model.num_scales
    n_evals = n_steps + int(spec.denoise)
    sigmas = [float(s) for s in model.sigmas.cpu()]

    if baseline:
        x0 = torch.rand(batch, *spec.shape, device=device)
        score = score_function(model.net, model.sigmas)

        def run(levels: list[float] = sigmas) -> None:
            official_annealed_langevin(score, x0, levels, per_level, spec.step_lr, denoise=spec.denoise)

        warmup = functools.partial(run, sigmas[:1])  # cudnn autotuning needs one level only
    else:
        def run() -> None:
            model.sample(batch, n_steps_each=per_level, step_lr=spec.step_lr, denoise=spec.denoise)

        warmup = run  # the whole run: compile, cudnn autotuning, CUDA-graph capture of each chunk

    reset_memory(device)
    warm = timed(warmup, device, 1)
    seconds = timed(run, device, 1)
    per_eval = seconds / n_evals
    return {"images_per_s": batch / (per_eval * spec.evals_per_image), "measured_steps": n_steps,
            "measured_evals": n_evals, "measured_levels": model.num_scales, "steps_per_level": per_level,
            "extrapolated_to_evals": spec.evals_per_image, "measured_s": seconds, "warmup_s": warm,
            "peak_mib": peak_memory_mib(device)}


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: ngf 8, batch 4, few steps")
    p.add_argument("--nets", default=",".join(NETS), help="comma list of: " + ", ".join(NETS) + " (default all)")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma list of: train, sample (default both)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--train-batch", type=int, default=None, help="default 128 (tiny: 4)")
    p.add_argument("--train-steps", type=int, default=None, help="timed training steps (default 20; tiny: 2)")
    p.add_argument("--train-warmup", type=int, default=None, help="warm-up steps (default 5; tiny: 1)")
    p.add_argument("--sample-batches", default=None,
                   help="comma list for every net (default 100,1000; cifar10_ncsnv2: 1000; tiny: 4,8)")
    p.add_argument("--sample-steps", type=int, default=None,
                   help="Langevin steps timed (default 50; tiny: 10), see NetSpec.timed_schedule")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak for MFU (default 989 = H100 SXM dense bf16 on CUDA; none on the CPU)")
    p.add_argument("--compile", dest="compile", action="store_true", default=None, help="torch.compile on")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="torch.compile off")
    p.add_argument("--compile-mode", default="default")
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--no-bf16", action="store_true")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (tiny default: 1)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p.parse_args(argv)


def fmt_rate(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:,.0f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    tiny = args.tiny
    threads = args.threads if args.threads is not None else (1 if tiny and device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    train_batch = args.train_batch or (4 if tiny else 128)
    train_steps = args.train_steps or (2 if tiny else 20)
    train_warmup = args.train_warmup or (1 if tiny else 5)
    sample_batches = args.sample_batches or ("4,8" if tiny else None)  # None: each net's own
    sample_steps = args.sample_steps or (10 if tiny else 50)
    peak_tflops = args.peak_tflops if args.peak_tflops is not None else (989.0 if device.type == "cuda" else None)
    use_compile = args.compile if args.compile is not None else not tiny
    perf = PerfSettings(enabled=True, compile=use_compile, compile_mode=args.compile_mode,
                        cuda_graphs=not args.no_cuda_graphs,
                        bf16=not args.no_bf16, channels_last=not args.no_channels_last).resolve(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the official main.py; TF32 convolutions: PyTorch's default

    names = [n.strip() for n in args.nets.split(",") if n.strip()]
    unknown = [n for n in names if n not in NETS]
    if unknown:
        print(f"error: unknown net(s) {', '.join(unknown)}; choose from {', '.join(NETS)}", file=sys.stderr)
        return 2
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks or any(t not in TASKS for t in tasks):
        print(f"error: --tasks must be a comma list of {', '.join(TASKS)} (got '{args.tasks}')", file=sys.stderr)
        return 2

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"# ncsn speed benchmark{' (--tiny: CPU smoke sizes, not a GPU measurement)' if tiny else ''}")
    print(f"device: {device} ({device_name}); torch {torch.__version__}; threads {torch.get_num_threads()}")
    print(f"fast path: {perf.describe()}")
    evals = {name: NETS[name].evals_per_image for name in names}
    print(f"sampling: about {sample_steps} steps timed, extrapolated to the evaluations per image of each net's "
          f"sampler ({', '.join(f'{n} {e:,}' for n, e in evals.items())}); MFU against {peak_tflops or 'n/a'} "
          "TFLOP/s (bf16 peak)")
    print()

    meta = {"device": str(device), "device_name": device_name, "torch": torch.__version__, "tiny": tiny,
            "perf": dataclasses.asdict(perf), "sample_steps_timed": sample_steps, "evals_per_image": evals,
            "peak_tflops": peak_tflops, "threads": torch.get_num_threads(), "tasks": tasks}
    records: list[dict[str, Any]] = []
    for name in names:
        spec = NETS[name]
        ngf = 8 if tiny else spec.ngf
        shape = spec.shape
        torch.manual_seed(0)
        net = spec.build(ngf)
        timed_sigmas, per_level = spec.timed_schedule(sample_steps)
        batches = [int(b) for b in sample_batches.split(",")] if sample_batches else list(spec.sample_batches)
        todo: list[tuple[str, int, float]] = []
        if "train" in tasks:
            todo.append(("train", train_batch, flops_per_image(net, shape, device, train=True)))
        if "sample" in tasks:
            sample_flops = flops_per_image(net, shape, device, train=False)
            todo += [("sample", b, sample_flops) for b in batches]
        for task, batch, flops in todo:
            row: dict[str, Any] = {"net": name, "ngf": ngf, "shape": list(shape), "task": task, "batch": batch,
                                   "flops_per_image": flops}
            for path in ("baseline", "fast"):
                path_perf = None if path == "baseline" else perf
                if task == "train":
                    model = make_model(spec, net, path_perf, device)
                    result = bench_train(model, shape, batch, train_steps, train_warmup, device, path == "baseline")
                else:
                    model = make_model(spec, net, path_perf, device, sigmas=timed_sigmas)
                    result = bench_sample(model, spec, batch, per_level, device, path == "baseline")
                rate = result["images_per_s"]
                per_image_flops = flops * (spec.evals_per_image if task == "sample" else 1)
                result["mfu"] = rate * per_image_flops / (peak_tflops * 1e12) if peak_tflops else None
                row[path] = result
                del model
            row["ratio"] = row["fast"]["images_per_s"] / row["baseline"]["images_per_s"]
            records.append(row)
            print(f"  measured {name} {task}@{batch}: baseline {fmt_rate(row['baseline']['images_per_s'])} img/s, "
                  f"fast {fmt_rate(row['fast']['images_per_s'])} img/s", file=sys.stderr, flush=True)
            if args.json:  # after every row: a run cut short keeps what it measured
                write_json(args.json, meta, records)

    mem_label = "peak MiB" if device.type == "cuda" else "peak RSS MiB (process)"
    print(f"| net | task | batch | baseline img/s | fast img/s | fast/baseline | {mem_label} base | "
          f"{mem_label} fast | MFU base | MFU fast | fast warm-up s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in records:
        b, f = r["baseline"], r["fast"]
        mfu = [("n/a" if x["mfu"] is None else f"{100 * x['mfu']:.2f}%") for x in (b, f)]
        task = r["task"] + ("*" if r["task"] == "sample" else "")
        print(f"| {r['net']} (ngf {r['ngf']}) | {task} | {r['batch']} | {fmt_rate(b['images_per_s'])} | "
              f"{fmt_rate(f['images_per_s'])} | {r['ratio']:.2f}x | {b['peak_mib']:,.0f} | {f['peak_mib']:,.0f} | "
              f"{mfu[0]} | {mfu[1]} | {f['warmup_s']:.1f} |")
    print(f"\n*sampling rates: about {sample_steps} steps timed, extrapolated to the network evaluations per image "
          "of each net's sampler: " + "; ".join(
              f"{n} {NETS[n].evals_per_image:,} (L {NETS[n].num_scales} x T {NETS[n].n_steps_each}"
              + (" + 1 denoising step)" if NETS[n].denoise else ")") for n in names) + ".\n")
    for r in records:
        print(f"ratio fast/baseline {r['net']} {r['task']}@{r['batch']}: {r['ratio']:.2f}x")

    if args.json:
        write_json(args.json, meta, records)
        print(f"\nwrote {args.json}")
    return 0


def write_json(path: str, meta: dict, records: list[dict]) -> None:
    """Write ``{"meta": ..., "results": [...]}`` atomically (a ``.part`` file renamed over ``path``)."""
    tmp = f"{path}.part"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "results": records}, f, indent=2)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
