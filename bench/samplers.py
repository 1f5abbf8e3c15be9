"""Sample quality per network evaluation: every sampler (ald, pc, cas and the few-step family: euler, heun,
dpmpp_2m, euler_ancestral, edm) at a few step counts on ONE checkpoint.
A benchmark, not a test.

    python bench/samplers.py RUN/checkpoints/last.ckpt                   # 256 samples per setting
    python bench/samplers.py CKPT --num-samples 1000 --batch-size 500    # on a GPU
    python bench/samplers.py CKPT --grid "ald:n_steps_each=4;pc:n_corrector=1,snr=0.2"   # your own settings

For each setting: the network evaluations per sample (NFE, ``ncsn.samplers``), the wall time of drawing the
samples (measured in this run, one setting after the other, from one seed), the dataset's built-in quality
metric (``ncsn.metrics``: its primary key, and for digits also ``quality/fd_ratio`` at this N, the number the
CPU recipe's targets are written in), the degenerate share and the class shares. Writes, next to the checkpoint
unless ``--out`` says otherwise: ``samplers.csv``, ``samplers.md`` (the table), ``samplers.png`` (quality
against NFE, one line per sampler) and ``grid_NN_<sampler>.png`` (the first 64 samples of each setting, to look at).

ALD's step size for T steps per level comes from NCSNv2 technique 4 on the checkpoint's σ list (as
``python -m ncsn.sigmas suggest``); cas gets η = step_lr/σ_L² values above the least its σ list allows.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

import torch
from torchvision.utils import save_image

from ncsn.app.cpu_timing import describe_kernels
from ncsn.app.sample import load_model
from ncsn.errors import UserError
from ncsn.samplers import describe_sampler
from ncsn.sigmas import technique4_step_lr


def parse_grid(text: str) -> list[dict]:
    """``"ald:n_steps_each=4,step_lr=1e-5;pc:n_corrector=1"`` → settings dicts."""
    settings = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        name, _, rest = item.partition(":")
        entry: dict = {"name": name.strip()}
        for pair in filter(None, (p.strip() for p in rest.split(","))):
            key, _, value = pair.partition("=")
            entry[key.strip()] = json.loads(value) if value.strip() not in ("true", "false") else value == "true"
        settings.append(entry)
    return settings


def default_grid(sigmas: torch.Tensor) -> list[dict]:
    """ALD at T = 1, 2, 4 (technique-4 step), pc with 0-2 corrector steps and three SNRs, cas at three η."""
    sigma_min = float(sigmas[-1])
    ratio = float((sigmas[0] / sigmas[-1]) ** (1.0 / max(1, len(sigmas) - 1)))
    grid = [{"name": "ald", "n_steps_each": t, "step_lr": technique4_step_lr(sigma_min, ratio, t), "denoise": True}
            for t in (1, 2, 4)]
    grid += [{"name": "pc", "n_corrector": n, "snr": 0.16, "denoise": True} for n in (0, 1, 2)]
    grid += [{"name": "pc", "n_corrector": 1, "snr": snr, "denoise": True} for snr in (0.1, 0.25)]
    least = 1.0 - 1.0 / float((sigmas[:-1] / sigmas[1:]).max())
    for eta in sorted({min(1.0, max(least * 1.3, e)) for e in (0.1, 0.2, 0.4)}):
        grid.append({"name": "cas", "n_steps_each": 1, "step_lr": eta * sigma_min**2, "denoise": True})
    grid.append({"name": "cas", "n_steps_each": 2, "step_lr": max(least * 1.3, 0.2) * sigma_min**2, "denoise": True})
    # the few-step family at its shipped defaults (≤ 50 NFE)
    grid += [{"name": "euler", "num_steps": 35}, {"name": "heun", "num_steps": 18},
             {"name": "dpmpp_2m", "num_steps": 20}, {"name": "euler_ancestral", "num_steps": 50},
             {"name": "edm", "num_steps": 18}]
    return grid


def draw(model, settings: dict, num: int, batch: int, seed: int) -> tuple[torch.Tensor, float]:
    generator = torch.Generator(device=model.device).manual_seed(seed)
    chunks = []
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for first in range(0, num, batch):
        chunks.append(model.sample(min(batch, num - first), generator=generator, **settings).cpu())
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return torch.cat(chunks), time.perf_counter() - start


def quality_metric(run_cfg, num: int, device):
    from ncsn.app.datamodules import quality_metric_for_data

    return quality_metric_for_data(run_cfg.data, num_samples=num, device=device)


def row_for(settings: dict, nfe: int, seconds: float, scores: dict, primary: str | None) -> dict:
    row = {"sampler": settings["name"], "settings": describe_sampler(settings), "nfe": nfe,
           "seconds": round(seconds, 2), "primary_key": primary or "",
           "primary": scores.get(primary) if primary else None,
           "primary_std": scores.get(f"{primary}_std") if primary else None}
    for key in ("quality/fd_ratio", "quality/degenerate", "quality/class_share_min", "quality/class_share_max",
                "quality/class_share_max_dev", "quality/sliced_wasserstein"):
        if key in scores:
            row[key.removeprefix("quality/")] = scores[key]
    return row


def fmt(value) -> str:
    if value is None or value == "":
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}" if math.isfinite(value) else str(value)
    return str(value)


def write_outputs(rows: list[dict], out: Path, title: str) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    csv_path = out / "samplers.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    md = [f"# {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    md_path = out / "samplers.md"
    md_path.write_text("\n".join(md) + "\n")
    paths = {"csv": csv_path, "markdown": md_path}
    key = next((k for k in ("fd_ratio", "primary") if any(row.get(k) is not None for row in rows)), None)
    if key is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for name in dict.fromkeys(row["sampler"] for row in rows):
            pts = sorted((row["nfe"], row[key]) for row in rows if row["sampler"] == name and row.get(key) is not None)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xlabel("network evaluations per sample (NFE)")
        ax.set_ylabel(key if key != "primary" else rows[0]["primary_key"])
        ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        png = out / "samplers.png"
        fig.savefig(png, dpi=120)
        plt.close(fig)
        paths["plot"] = png
    return paths


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("ckpt", help="a checkpoint of ours (RUN/checkpoints/last.ckpt)")
    p.add_argument("--num-samples", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--grid", default=None, help='settings to run, e.g. "ald:n_steps_each=4;pc:n_corrector=1"')
    p.add_argument("--out", default=None, help="output folder (default: the checkpoint's run dir /samplers)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from ncsn.devices import pick_device

    try:
        device = pick_device(args.device)
        model, run_cfg = load_model(args.ckpt, device=device)
        grid = parse_grid(args.grid) if args.grid else default_grid(model.sigmas.cpu())
        plans = [(s, model.sampling_plan(model.sampling_settings(**s))) for s in grid]
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    metric = quality_metric(run_cfg, args.num_samples, device)
    primary = metric.name if metric is not None else None
    out = Path(args.out) if args.out else Path(args.ckpt).resolve().parent.parent / "samplers"
    print(f"{args.ckpt}: {model.num_scales} levels, {args.num_samples} samples per setting on {device}, "
          f"metric {primary}", flush=True)
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"cpu ({describe_kernels()}, {torch.get_num_threads()} threads)"  # ATEN_CPU_CAPABILITY picks
    title = f"{Path(args.ckpt).name} ({model.num_scales} levels), {args.num_samples} samples, {where}"
    rows, paths = [], {}
    for settings, plan in plans:
        full = model.sampling_settings(**settings)
        samples, seconds = draw(model, full, args.num_samples, args.batch_size, args.seed)
        scores = metric(samples.clamp(0, 1)) if metric is not None else {}
        rows.append(row_for(full, plan.nfe, seconds, scores, primary))
        out.mkdir(parents=True, exist_ok=True)
        save_image(samples[:64].clamp(0, 1), out / f"grid_{len(rows):02d}_{full['name']}.png", nrow=8, padding=1)
        print("  " + "  ".join(f"{k}={fmt(v)}" for k, v in rows[-1].items() if k != "sampler"), flush=True)
        paths = write_outputs(rows, out, title)  # after every row: a run cut short keeps the rows it finished
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
