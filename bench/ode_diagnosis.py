"""Why a deterministic sampler leaves noise in the samples: how much noise the network *thinks* it sees along a
sampler's path, against what it sees on real data noised to the same σ. A diagnosis, not a test.

    python bench/ode_diagnosis.py RUN/checkpoints/last.ckpt                         # heun vs edm, 18 steps
    python bench/ode_diagnosis.py CKPT --samplers heun,edm,euler_ancestral --steps 18 --num 64

After each step of each sampler the sample x carries noise σ (the grid's next value). The network's own estimate
of that noise is σ·s(x, σ) (for NCSNv2, the raw output: −z on data x + σ z); its mean square per pixel is about
1 where the network recognises the noise fully and falls towards 0 where it takes the noise for image. The table
gives, per σ, that mean square on the sampler's path divided by the same on held-out real digits noised to σ
(``ratio``): ratio ≈ 1 means the path looks like noised data to the network; ratio ≪ 1 means the network
underestimates the noise there, so the step removes too little of it and the rest stays in the sample. The last
column is each sampler's high-frequency energy of the final samples (mean squared 3×3 Laplacian) over the real
digits'. Prints a markdown table; ``--out`` also writes it and the final grids.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.utils import save_image

from ncsn.app.sample import load_model
from ncsn.errors import UserError

LAPLACE = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def noise_estimate(model, x: torch.Tensor, sigma: float) -> float:
    """Mean square per pixel of σ·s(x, σ): the network's estimate of the noise x carries."""
    s = model.score_fn(x, torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device))
    return float((sigma * s).pow(2).mean())


def high_freq(x: torch.Tensor) -> float:
    kernel = LAPLACE.to(x)[None, None].expand(x.shape[1], 1, 3, 3)
    return float(F.conv2d(x.clamp(0, 1), kernel, groups=x.shape[1]).pow(2).mean())


def real_images(run_cfg, num: int) -> torch.Tensor:
    from hydra.utils import instantiate

    dm = instantiate(run_cfg.data)
    dm.setup("fit")
    batches = []
    for batch in dm.val_dataloader():
        batches.append(batch[0] if isinstance(batch, (list, tuple)) else batch)
        if sum(b.shape[0] for b in batches) >= num:
            break
    return torch.cat(batches)[:num]


@torch.no_grad()
def diagnose(model, run_cfg, names: list[str], steps: int, num: int, seed: int) -> tuple[list[dict], dict]:
    real = real_images(run_cfg, num).to(model.device)
    rows: dict[float, dict] = {}
    finals = {}
    gen = torch.Generator().manual_seed(seed)
    for name in names:
        recorded = []
        settings = model.sampling_settings(name=name, num_steps=steps)
        plan = model.sampling_plan(settings)
        out = model.sample(num, generator=torch.Generator().manual_seed(seed), callback=recorded.append, name=name,
                           num_steps=steps)
        finals[name] = out
        for i, step in enumerate(recorded):
            sigma = float(plan.level_sigmas[i + 1])
            if sigma <= 0:
                continue
            row = rows.setdefault(sigma, {"sigma": sigma})
            if "data" not in row:
                noised = real + sigma * torch.randn(real.shape, generator=gen).to(real)
                row["data"] = noise_estimate(model, noised, sigma)
            row[name] = noise_estimate(model, step["x"], sigma) / row["data"]
    hf_real = high_freq(real)
    hf = {name: high_freq(x) / hf_real for name, x in finals.items()}
    return [rows[s] for s in sorted(rows, reverse=True)], {"hf": hf, "finals": finals}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("ckpt")
    p.add_argument("--samplers", default="heun,edm")
    p.add_argument("--steps", type=int, default=18)
    p.add_argument("--num", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="folder for diagnosis.md and the final grids")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, run_cfg = load_model(args.ckpt)
        names = [n.strip() for n in args.samplers.split(",") if n.strip()]
        rows, extra = diagnose(model, run_cfg, names, args.steps, args.num, args.seed)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    lines = [(f"# noise the network sees on each path / on noised real data ({Path(args.ckpt).name}, "
             f"{args.steps} steps, {args.num} samples)"), "",
             "| σ | data ms(σ·s) | " + " | ".join(f"{n} ratio" for n in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for row in rows:
        cells = [f"{row.get(n, float('nan')):.3f}" for n in names]
        lines.append(f"| {row['sigma']:.4g} | {row['data']:.3g} | " + " | ".join(cells) + " |")
    lines += ["", "high-frequency energy of the final samples / real digits: "
              + ", ".join(f"{n} {v:.2f}" for n, v in extra["hf"].items())]
    text = "\n".join(lines)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "diagnosis.md").write_text(text + "\n")
        for name, x in extra["finals"].items():
            save_image(x[:64].clamp(0, 1), out / f"final_{name}.png", nrow=8, padding=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
