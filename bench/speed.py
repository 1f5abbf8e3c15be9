"""Speed and memory of training and sampling: the official code's way of running vs our fast path.

    python bench/speed.py                      # the paper's CIFAR-10 and MNIST networks (needs a GPU to be useful)
    python bench/speed.py --tiny               # CPU smoke run at tiny sizes (CI: ``make bench-cpu``)
    python bench/speed.py --json out.json --peak-tflops 989

For each network -- the paper's CIFAR-10 NCSN (ngf 128, 3x32x32, L = 10) and MNIST NCSN (ngf 64, 1x28x28) --
it measures

* training images/s at batch 128 (one DSM step: forward, loss, backward, Adam step; synthetic batches already
  on the device, so data loading is not part of it);
* annealed-Langevin sampling images/s at batch 100 and 1,000. The paper's sampler runs T = 100 steps at each
  of L = 10 levels (1,000 network evaluations per image); we time ``--sample-steps`` steps (default 50: 5 per
  level, all 10 levels) after a warm-up call and extrapolate linearly to 1,000 steps per image;

for two ways of running the same network:

* **baseline**: the official code (ermongroup/ncsn): fp32, eager, the Python loop of ``anneal_Langevin_dynamics``
  (labels per level, a fresh ``randn_like`` per step, ``x = x + step_size * grad + noise``), ``loss.item()``
  every training step (the official loop logs it), Adam with PyTorch's default implementation,
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

``--tiny`` (CPU): ngf 8, training batch 4, sampling batches 4 and 8, 10 sampling steps, compile off unless
``--compile``; it checks that the script and both paths run, its numbers say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import math
import platform
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from ncsn.module import ScoreModel
from ncsn.nets import NCSN
from ncsn.perf import PerfSettings
from ncsn.sigmas import geometric_sigmas

NETS = {
    # name: (channels, image size, ngf) -- the paper's networks
    "cifar10": (3, 32, 128),
    "mnist": (1, 28, 64),
}
NUM_SCALES = 10
STEP_LR = 2e-5
PAPER_STEPS = 1000  # T = 100 steps x L = 10 levels per image


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
def official_annealed_langevin(scorenet: torch.nn.Module, x_mod: torch.Tensor, sigmas: list[float],
                               n_steps_each: int, step_lr: float) -> torch.Tensor:
    """``anneal_Langevin_dynamics`` of the official code (minus the per-step copy of every intermediate
    sample to the CPU, which only serves the trajectory figures)."""
    for c, sigma in enumerate(sigmas):
        labels = torch.ones(x_mod.shape[0], device=x_mod.device) * c
        labels = labels.long()
        step_size = step_lr * (sigma / sigmas[-1]) ** 2
        for _ in range(n_steps_each):
            noise = torch.randn_like(x_mod) * math.sqrt(step_size * 2)
            grad = scorenet(x_mod, labels)
            x_mod = x_mod + step_size * grad + noise
    return x_mod


# ---------------------------------------------------------------------------------------------- measurements
def make_model(net: torch.nn.Module, shape: tuple[int, ...], perf: PerfSettings | None,
               device: torch.device) -> ScoreModel:
    model = ScoreModel(copy.deepcopy(net), geometric_sigmas(1.0, 0.01, NUM_SCALES), list(shape),
                       sampler={"n_steps_each": 100, "step_lr": STEP_LR}, perf=perf)
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


def bench_sample(model: ScoreModel, shape: tuple[int, ...], batch: int, steps: int, device: torch.device,
                 baseline: bool) -> dict:
    model.eval()
    per_level = max(1, steps // NUM_SCALES)
    n_steps = per_level * NUM_SCALES
    sigmas = [float(s) for s in model.sigmas.cpu()]

    if baseline:
        x0 = torch.rand(batch, *shape, device=device)

        def run() -> None:
            official_annealed_langevin(model.net, x0, sigmas, per_level, STEP_LR)
    else:
        def run() -> None:
            model.sample(batch, n_steps_each=per_level)

    reset_memory(device)
    warm = timed(run, device, 1)  # compile, cudnn autotuning, CUDA-graph capture
    seconds = timed(run, device, 1)
    per_step = seconds / n_steps
    return {"images_per_s": batch / (per_step * PAPER_STEPS), "measured_steps": n_steps,
            "measured_s": seconds, "warmup_s": warm, "peak_mib": peak_memory_mib(device)}


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: ngf 8, batch 4, few steps")
    p.add_argument("--nets", default="cifar10,mnist", help="comma list of: " + ", ".join(NETS))
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--train-batch", type=int, default=None, help="default 128 (tiny: 4)")
    p.add_argument("--train-steps", type=int, default=None, help="timed training steps (default 20; tiny: 2)")
    p.add_argument("--train-warmup", type=int, default=None, help="warm-up steps (default 5; tiny: 1)")
    p.add_argument("--sample-batches", default=None, help="comma list (default 100,1000; tiny: 4,8)")
    p.add_argument("--sample-steps", type=int, default=None,
                   help="Langevin steps timed, spread over the 10 levels (default 50; tiny: 10)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak for MFU (default 989 = H100 SXM dense bf16 on CUDA; none on the CPU)")
    p.add_argument("--compile", dest="compile", action="store_true", default=None, help="torch.compile on")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="torch.compile off")
    p.add_argument("--compile-mode", default="default")
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--steps-per-graph", type=int, default=10)
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
    sample_batches = [int(b) for b in (args.sample_batches or ("4,8" if tiny else "100,1000")).split(",")]
    sample_steps = args.sample_steps or (10 if tiny else 50)
    peak_tflops = args.peak_tflops if args.peak_tflops is not None else (989.0 if device.type == "cuda" else None)
    use_compile = args.compile if args.compile is not None else not tiny
    perf = PerfSettings(enabled=True, compile=use_compile, compile_mode=args.compile_mode,
                        cuda_graphs=not args.no_cuda_graphs, steps_per_graph=args.steps_per_graph,
                        bf16=not args.no_bf16, channels_last=not args.no_channels_last).resolve(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the official main.py; TF32 convolutions: PyTorch's default

    names = [n.strip() for n in args.nets.split(",") if n.strip()]
    unknown = [n for n in names if n not in NETS]
    if unknown:
        print(f"error: unknown net(s) {', '.join(unknown)}; choose from {', '.join(NETS)}", file=sys.stderr)
        return 2

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"# ncsn speed benchmark{' (--tiny: CPU smoke sizes, not a GPU measurement)' if tiny else ''}")
    print(f"device: {device} ({device_name}); torch {torch.__version__}; threads {torch.get_num_threads()}")
    print(f"fast path: {perf.describe()}")
    print(f"sampling: {sample_steps} steps timed, extrapolated to {PAPER_STEPS} steps/image "
          f"(T=100 x L={NUM_SCALES}); MFU against {peak_tflops or 'n/a'} TFLOP/s (bf16 peak)")
    print()

    records = []
    for name in names:
        channels, size, ngf = NETS[name]
        if tiny:
            ngf = 8
        shape = (channels, size, size)
        torch.manual_seed(0)
        net = NCSN(in_channels=channels, image_size=size, ngf=ngf, num_scales=NUM_SCALES)
        train_flops = flops_per_image(net, shape, device, train=True)
        sample_flops = flops_per_image(net, shape, device, train=False)
        tasks = [("train", train_batch, train_flops)] + [("sample", b, sample_flops) for b in sample_batches]
        for task, batch, flops in tasks:
            row: dict[str, Any] = {"net": name, "ngf": ngf, "shape": list(shape), "task": task, "batch": batch,
                                   "flops_per_image": flops}
            for path in ("baseline", "fast"):
                model = make_model(net, shape, None if path == "baseline" else perf, device)
                if task == "train":
                    result = bench_train(model, shape, batch, train_steps, train_warmup, device, path == "baseline")
                else:
                    result = bench_sample(model, shape, batch, sample_steps, device, path == "baseline")
                rate = result["images_per_s"]
                per_image_flops = flops * (PAPER_STEPS if task == "sample" else 1)
                result["mfu"] = rate * per_image_flops / (peak_tflops * 1e12) if peak_tflops else None
                row[path] = result
                del model
            row["ratio"] = row["fast"]["images_per_s"] / row["baseline"]["images_per_s"]
            records.append(row)
            print(f"  measured {name} {task}@{batch}: baseline {fmt_rate(row['baseline']['images_per_s'])} img/s, "
                  f"fast {fmt_rate(row['fast']['images_per_s'])} img/s", file=sys.stderr, flush=True)

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
    print(f"\n*sampling rates: {sample_steps} steps timed, extrapolated to {PAPER_STEPS} network evaluations per "
          "image (the paper's T=100 x L=10).\n")
    for r in records:
        print(f"ratio fast/baseline {r['net']} {r['task']}@{r['batch']}: {r['ratio']:.2f}x")

    if args.json:
        meta = {"device": str(device), "device_name": device_name, "torch": torch.__version__, "tiny": tiny,
                "perf": dataclasses.asdict(perf), "sample_steps_timed": sample_steps,
                "extrapolated_to_steps": PAPER_STEPS, "peak_tflops": peak_tflops,
                "threads": torch.get_num_threads()}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": records}, f, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
