"""Summarise a Hydra sweep: ``python -m ncsn.tools.report SWEEP_DIR``.

Reads every job dir of the sweep (``<sweep dir>/<job num>/``: ``.hydra/overrides.yaml``, ``metrics.json``,
``error.txt``, ``checkpoints/config.yaml``, ``samples/step_*.png``) and writes into SWEEP_DIR:

* ``report.csv``: one row per job: job number, the swept values (one column per swept key), status
  (``ok`` / ``failed``), final ``val/loss`` next to the zero-output loss (their ratio near 1 = the network
  learned nothing), the output mean square and gradient norm, the run's collapse warning if any (``collapse``;
  also named at the top of ``report.md``), the per-σ losses in fixed log-σ bins (``val/loss_sigma_bin/<lo>-<hi>``,
  the same columns for every σ list), ``val/fid`` when a job logged it,
  ``train/loss``, images/s, global step, training seconds, the error line of failed jobs and the job dir,
  every ``quality/*`` value of the built-in sample-quality metric and the job's ``rank``;
* ``report.md``: the same as a Markdown table (the σ-bin columns only when there are few), ranked by the
  sample-quality metric when the jobs logged it (``val/loss`` otherwise: it is not comparable across σ
  schedules), the best job, the settings every job shared, and the two figures;
* ``val_loss_per_sigma.png``: each job's per-level validation loss against σ_i (log x-axis), from
  ``metrics.json``'s ``per_sigma`` (older runs: the ``val/loss_sigma_i`` keys and the σ list of the job's
  ``checkpoints/config.yaml``), so runs with different σ lists overlay on one σ axis;
* ``samples_side_by_side.png``: each job's latest sample grid, labelled with its swept values and its quality.

A job with ``error.txt`` (newer than its ``metrics.json``, if any) or without ``metrics.json`` is a failed row
with its error line (``no metrics.json (still running or killed)``): the report never crashes on it.
It can be re-run at any time (while the sweep runs, too); every file is replaced atomically. Reading the job dirs
and building the rows is ``ncsn.tools.report_jobs``.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys
from pathlib import Path
from typing import Any

from ncsn.errors import UserError
from ncsn.tools.report_jobs import (
    NO_METRICS,
    Job,
    as_number,
    build_rows,
    find_job_dirs,
    fixed_overrides,
    format_cell,
    job_label,
    ranking_key,
    read_job,
    sigma_bin_columns,
    swept_columns,
)

__all__ = ["NO_METRICS", "main", "make_report"]

EXIT_USER_ERROR = 2


# ------------------------------------------------------------------------------------------------ writing


def _write_atomic(path: Path, data: bytes | str) -> None:
    tmp = path.with_name(f".{path.name}.part")
    if isinstance(data, str):
        tmp.write_text(data)
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)


def write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    _write_atomic(path, buf.getvalue())


def _save_figure(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    _write_atomic(path, buf.getvalue())


def plot_val_loss_per_sigma(path: Path, jobs: list[Job], swept: list[str]) -> int:
    """Per-level validation loss vs σ (log x) for every job that has both; returns the number of lines."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    lines = 0
    for job in jobs:
        losses = job.per_sigma_losses()
        if not losses or not job.sigmas:
            continue
        pairs = [(s, v) for s, v in zip(job.sigmas, losses, strict=False) if as_number(v) is not None and s > 0]
        if not pairs:
            continue
        xs, ys = zip(*pairs, strict=True)
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, label=job_label(job, swept))
        lines += 1
    ax.set_xscale("log")
    ax.set_xlabel("σ_i (noise level)")
    ax.set_ylabel("validation loss at σ_i  (λ(σ)=σ² weighted DSM)")
    ax.set_title("Per-level validation loss")
    ax.grid(True, which="both", alpha=0.3)
    if lines:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    else:
        ax.text(0.5, 0.5, "no job has per-level validation losses yet", ha="center", va="center",
                transform=ax.transAxes)
    _save_figure(fig, path)
    return lines


def plot_samples_side_by_side(path: Path, jobs: list[Job], swept: list[str], max_cols: int = 6) -> int:
    """Each job's latest sample grid in one figure (placeholders for jobs without one); returns the count."""
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    n = max(1, len(jobs))
    cols = min(max_cols, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.6 * rows), squeeze=False)
    shown = 0
    for ax in axes.flat:
        ax.axis("off")
    for ax, job in zip(axes.flat, jobs, strict=False):
        label = job_label(job, swept)
        key = job.quality_key
        if key and as_number(job.metrics.get(key)) is not None:
            label += f"\n{key.split('/', 1)[1]} {job.metrics[key]:.4g}"
        if job.sample_png is not None:
            try:
                img = mpimg.imread(job.sample_png)
                ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
                label += f"\n{job.sample_png.stem.replace('_', ' ')}"
                shown += 1
            except Exception as exc:  # noqa: BLE001 - a half-written or broken PNG is shown as such
                ax.text(0.5, 0.5, f"unreadable: {exc}"[:60], ha="center", va="center", wrap=True)
        else:
            text = "failed" if not job.ok else "no samples"
            if job.error:
                text += "\n" + "\n".join(job.error[i : i + 40] for i in range(0, min(len(job.error), 160), 40))
            ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=7, transform=ax.transAxes)
        ax.set_title("\n".join(label[i : i + 48] for i in range(0, len(label), 48)), fontsize=8)
    if not jobs:
        axes.flat[0].text(0.5, 0.5, "no jobs", ha="center", va="center")
    _save_figure(fig, path)
    return shown


def write_markdown(path: Path, sweep_dir: Path, jobs: list[Job], swept: list[str], columns: list[str],
                   rows: list[dict[str, Any]]) -> None:
    n_ok = sum(j.ok for j in jobs)
    out = [f"# Sweep report: `{sweep_dir.name}`", "",
           f"- sweep dir: `{sweep_dir.resolve()}`",
           f"- jobs: {len(jobs)} ({n_ok} ok, {len(jobs) - n_ok} failed)",
           f"- swept: {', '.join(f'`{k}`' for k in swept) or '(none found)'}"]
    fixed = fixed_overrides([j for j in jobs if j.overrides], swept)
    if fixed:
        out.append(f"- shared overrides: `{' '.join(fixed)}`")
    rank_by = ranking_key(jobs)
    best = next((r for r in rows if r.get("rank") == 1), None)
    if best is not None:
        values = ", ".join(f"{k}={best[k]}" for k in swept if best[k] not in ("", None))
        out.append(f"- best {rank_by}: {best[rank_by]:.4g} (job {best['job']}{': ' + values if values else ''})")
    if rank_by == "val/loss":
        out.append("- ranked by val/loss: no job logged a sample-quality metric (callbacks.sample_grid.quality); "
                   "val/loss is not comparable across σ schedules")
    else:
        out.append(f"- ranked by {rank_by} (sample quality of each job's final samples, lower is better; "
                   "see the README's 'Sample quality' section)")
    collapsed = [r for r in rows if r.get("collapse")]
    if collapsed:
        out.append(f"- **collapsed: {len(collapsed)} job(s)** ({', '.join(str(r['job']) for r in collapsed)}): "
                   f"{collapsed[0]['collapse']}")
    out.append("")
    bin_cols = sigma_bin_columns(jobs)
    shown = [c for c in columns if c != "dir" and (c not in bin_cols or len(bin_cols) <= 12)]
    out.append("| " + " | ".join(shown) + " |")
    out.append("|" + "|".join("---" for _ in shown) + "|")
    for row in sorted(rows, key=lambda r: (r.get("rank") is None, r.get("rank") or 0)):
        cells = [format_cell(row.get(c)).replace("|", "\\|") for c in shown]
        out.append("| " + " | ".join(cells) + " |")
    if len(bin_cols) > 12:
        out.append(f"\n{len(bin_cols)} per-σ losses (val/loss_sigma_bin/<lo>-<hi>): see report.csv.")
    else:
        out.append("\nval/loss_sigma_bin/<lo>-<hi>: validation loss of the levels with lo <= σ < hi (fixed bins, the "
                   "same in every run).")
    out += ["", "## Validation loss per noise level", "", "![val loss per sigma](val_loss_per_sigma.png)",
            "", "## Latest samples", "", "![samples](samples_side_by_side.png)", ""]
    _write_atomic(path, "\n".join(out))


def make_report(sweep_dir: str | Path) -> dict[str, Path]:
    """Write report.md, report.csv and the two figures into ``sweep_dir``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise UserError(f"sweep dir {str(sweep_dir)!r} does not exist; pass the dir of a multirun "
                        "(outputs/train/multiruns/<time>)")
    job_dirs = find_job_dirs(sweep_dir)
    if not job_dirs:
        raise UserError(f"{str(sweep_dir)!r} holds no job dirs (subdirs with .hydra/, metrics.json or "
                        "error.txt); pass the dir of a multirun (outputs/train/multiruns/<time>)")
    jobs = [read_job(p) for p in job_dirs]
    swept = swept_columns(jobs, sweep_dir)
    columns, rows = build_rows(jobs, swept)
    paths = {name: sweep_dir / name for name in
             ("report.csv", "report.md", "val_loss_per_sigma.png", "samples_side_by_side.png")}
    write_csv(paths["report.csv"], columns, rows)
    plot_val_loss_per_sigma(paths["val_loss_per_sigma.png"], jobs, swept)
    plot_samples_side_by_side(paths["samples_side_by_side.png"], jobs, swept)
    write_markdown(paths["report.md"], sweep_dir, jobs, swept, columns, rows)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ncsn.tools.report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", help="a multirun dir, e.g. outputs/train/multiruns/<time>")
    args = parser.parse_args(argv)
    try:
        paths = make_report(args.sweep_dir)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    rows = list(csv.DictReader(paths["report.csv"].open()))
    n_ok = sum(r["status"] == "ok" for r in rows)
    print(f"{len(rows)} jobs ({n_ok} ok, {len(rows) - n_ok} failed); wrote "
          + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
