"""How large a training batch fits on one GPU? An ESTIMATE from activation sizes, no GPU needed.

    python bench/memory_estimate.py [--gib 80] [experiment ...]      # default: the NCSNv2 experiments

Builds each experiment's network on the meta device (shapes only, instant at any size), runs one forward at the
experiment's image size and sums the tensors autograd saves for the backward pass (parameters excluded): the
activation bytes per image in fp32. Training memory is then ``batch x activations x CALIBRATION + states``, with
states = weights, gradients, Adam's two moments and the EMA copy (5 x 4 bytes a parameter). CALIBRATION is fitted
to the one measured peak we have: the NCSNv2 CIFAR-10 network at batch 128 peaked at 8.6 GiB in fp32 eager and
3.3 GiB with the fast path on an H200 (README "Measured on one H200"); this script's sum gives 7.4 GiB of
activations + 0.55 GiB of states there. The fast-path column scales the activations by that run's measured ratio,
which was measured on the small network only. Per device under DDP: the global batch / the number of devices.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learns import compose  # bench/ is not a package: its directory is on sys.path above

GIB = 2**30
MEASURED_FP32_GIB, MEASURED_FAST_GIB = 8.6, 3.3  # NCSNv2 CIFAR-10 at batch 128, H200, README
EXPERIMENTS = ["cifar10_ncsnv2", "celeba64_ncsnv2", "church_ncsnv2", "bedroom_ncsnv2", "tower_ncsnv2", "ffhq_ncsnv2"]


def activation_bytes(experiment: str) -> tuple[float, int, int, int]:
    """(fp32 bytes autograd saves per image, parameters, image size, global batch) of ``experiment``."""
    from hydra.utils import instantiate

    cfg = compose([f"experiment={experiment}"])
    size, channels = int(cfg.data.image_size), int(cfg.data.channels)
    with torch.device("meta"):
        net = instantiate(cfg.model.net)
        x = torch.empty(2, channels, size, size)
    params = {id(p) for p in net.parameters()}
    saved: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in params:
            saved.setdefault(id(t), t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x, torch.zeros(2, dtype=torch.long))
    per_image = sum(t.numel() * t.element_size() for t in saved.values()) / 2
    return per_image, sum(p.numel() for p in net.parameters()), size, int(cfg.data.batch_size)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("experiments", nargs="*", default=EXPERIMENTS)
    p.add_argument("--gib", type=float, default=80 * 1e9 / GIB, help="device memory in GiB (80 GB = 74.5 GiB)")
    args = p.parse_args(argv)

    act, n, _, _ = activation_bytes("cifar10_ncsnv2")
    states = 20 * n
    fp32 = (MEASURED_FP32_GIB * GIB - states) / (128 * act)
    fast = (MEASURED_FAST_GIB * GIB - states) / (128 * act)
    print(f"calibration on cifar10_ncsnv2 at batch 128: x{fp32:.2f} fp32 eager, x{fast:.2f} fast path")
    print("experiment | image | MiB/image saved | states GiB | recipe batch: GiB fp32 / fast | "
          f"largest batch on {args.gib:.1f} GiB: fp32 / fast")
    for experiment in args.experiments:
        act, n, size, batch = activation_bytes(experiment)
        states = 20 * n
        need = [(batch * act * k + states) / GIB for k in (fp32, fast)]
        fits = [int((args.gib * GIB * 0.95 - states) // (act * k)) for k in (fp32, fast)]  # 5% allocator slack
        print(f"{experiment} | {size} | {act / 2**20:.0f} | {states / GIB:.2f} | {batch}: {need[0]:.0f} / "
              f"{need[1]:.0f} | {fits[0]} / {fits[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
