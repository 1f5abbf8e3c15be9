"""Summarise a Hydra sweep: ``python -m ncsn.report SWEEP_DIR``.

Reads every job dir of the sweep (``<sweep dir>/<job num>/``: ``.hydra/overrides.yaml``, ``metrics.json``,
``error.txt``, ``checkpoints/config.yaml``, ``samples/step_*.png``) and writes into SWEEP_DIR:

* ``report.csv``: one row per job: job number, the swept values (one column per swept key), status
  (``ok`` / ``failed``), final ``val/loss`` next to the zero-output loss (their ratio near 1 = the network
  learned nothing), the output mean square and gradient norm, the run's collapse warning if any (``collapse``;
  also named at the top of ``report.md``), every ``val/loss_sigma_i``, ``val/fid`` when a job logged it,
  ``train/loss``, images/s, global step, training seconds, the error line of failed jobs and the job dir,
  every ``quality/*`` value of the built-in sample-quality metric and the job's ``rank``;
* ``report.md``: the same as a Markdown table (per-level losses only when there are few levels), ranked by the
  sample-quality metric when the jobs logged it (``val/loss`` otherwise: it is not comparable across σ
  schedules), the best job, the settings every job shared, and the two figures;
* ``val_loss_per_sigma.png``: each job's per-level validation loss against σ_i (log x-axis), from
  ``metrics.json``'s ``per_sigma`` (older runs: the ``val/loss_sigma_i`` keys and the σ list of the job's
  ``checkpoints/config.yaml``);
* ``samples_side_by_side.png``: each job's latest sample grid, labelled with its swept values and its quality.

A job with ``error.txt`` (newer than its ``metrics.json``, if any) or without ``metrics.json`` is a failed row
with its error line (``no metrics.json (still running or killed)``): the report never crashes on it.
It can be re-run at any time (while the sweep runs, too); every file is replaced atomically.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ncsn.errors import UserError
from ncsn.sweeps import override_items, read_sweep_overrides, sweep_keys

EXIT_USER_ERROR = 2
NO_METRICS = "no metrics.json (still running or killed)"
SIGMA_KEY = re.compile(r"^val/loss_sigma_(\d+)$")
STEP_PNG = re.compile(r"^step_(\d+)\.png$")


@dataclass
class Job:
    """What one job dir holds."""

    path: Path
    num: int | None
    overrides: list[tuple[str, str]] = field(default_factory=list)
    raw_overrides: list[str] = field(default_factory=list)
    sweeper_params: dict | None = None
    record: dict | None = None  # metrics.json
    error: str | None = None
    sigmas: list[float] | None = None
    sample_png: Path | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.record is not None

    @property
    def metrics(self) -> dict[str, Any]:
        return dict((self.record or {}).get("metrics") or {})

    def per_sigma_losses(self) -> list[float | None]:
        """The last validation's loss at each level (None where no sample was drawn): from ``metrics.json``'s
        ``per_sigma`` (every level), or from the ``val/loss_sigma_i`` keys of runs that logged them."""
        curve = (self.record or {}).get("per_sigma")
        if curve and curve.get("loss"):
            return list(curve["loss"])
        found = {int(m.group(1)): v for k, v in self.metrics.items() if (m := SIGMA_KEY.match(k))}
        return [found.get(i) for i in range(max(found) + 1)] if found else []

    @property
    def quality_key(self) -> str | None:
        """The primary key of the sample-quality metric this job logged (lower is better), or None."""
        quality = (self.record or {}).get("quality") or {}
        if quality.get("metric") in self.metrics:
            return quality["metric"]
        from ncsn.callbacks import quality_key_in

        return quality_key_in(self.metrics)


# ------------------------------------------------------------------------------------------------ reading


def _is_job_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in (".hydra", "metrics.json", "error.txt"))


def find_job_dirs(sweep_dir: Path) -> list[Path]:
    """The job dirs directly under ``sweep_dir``, in job-number order (numeric names first)."""
    dirs = [p for p in sweep_dir.iterdir() if _is_job_dir(p)]
    return sorted(dirs, key=lambda p: (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name))


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else "failed (empty error.txt)"


def _load_yaml(path: Path) -> Any:
    try:
        return OmegaConf.load(path)
    except Exception:  # noqa: BLE001 - missing or broken files are reported as missing
        return None


def _sigmas_from_config(path: Path) -> list[float] | None:
    """The σ list of a job, by instantiating the ``sigmas`` node of its resolved config."""
    cfg = _load_yaml(path)
    if cfg is None:
        return None
    node = OmegaConf.select(cfg, "sigmas", default=None) or OmegaConf.select(cfg, "model.sigmas", default=None)
    if node is None:
        return None
    try:
        from hydra.utils import instantiate

        values = instantiate(node)
        return [float(v) for v in (values.tolist() if hasattr(values, "tolist") else values)]
    except Exception:  # noqa: BLE001 - an invalid schedule (a failed job) just has no σ axis
        return None


def latest_sample_png(job_dir: Path) -> Path | None:
    pngs = [(int(m.group(1)), p) for p in (job_dir / "samples").glob("step_*.png") if (m := STEP_PNG.match(p.name))]
    return max(pngs)[1] if pngs else None


def read_job(path: Path) -> Job:
    hydra_cfg = _load_yaml(path / ".hydra" / "hydra.yaml")
    # the dir name is the job number with Hydra's default subdir; else hydra.job.num from .hydra/hydra.yaml
    num = int(path.name) if path.name.isdigit() else None
    if num is None and hydra_cfg is not None:
        num = OmegaConf.select(hydra_cfg, "hydra.job.num", default=None)
    job = Job(path=path, num=None if num is None else int(num))
    if hydra_cfg is not None:
        params = OmegaConf.select(hydra_cfg, "hydra.sweeper.params", default=None)
        job.sweeper_params = OmegaConf.to_container(params) if params is not None else None
    overrides = _load_yaml(path / ".hydra" / "overrides.yaml")
    if overrides is not None:
        job.raw_overrides = [str(o) for o in overrides]
        job.overrides = override_items(job.raw_overrides)

    metrics_path, error_path = path / "metrics.json", path / "error.txt"
    if metrics_path.exists():
        try:
            job.record = json.loads(metrics_path.read_text())
        except (OSError, ValueError) as exc:
            job.error = f"unreadable metrics.json: {exc}"
    # an error.txt older than metrics.json is from an earlier attempt that a resumed run has since finished
    if error_path.exists() and (job.record is None or error_path.stat().st_mtime >= metrics_path.stat().st_mtime):
        try:
            job.error = _first_line(error_path.read_text(errors="replace"))
        except OSError as exc:
            job.error = f"unreadable error.txt: {exc}"
    if job.error is None and job.record is None:
        job.error = NO_METRICS
    curve = (job.record or {}).get("per_sigma") or {}
    job.sigmas = curve.get("sigma") or _sigmas_from_config(path / "checkpoints" / "config.yaml")
    job.sample_png = latest_sample_png(path)
    return job


def swept_columns(jobs: list[Job], sweep_dir: Path) -> list[str]:
    """Keys that vary across the sweep, in command-line order: declared sweeps (multirun.yaml,
    hydra.sweeper.params) and any override whose value differs between jobs."""
    params: dict = {}
    for job in jobs:
        params.update(job.sweeper_params or {})
    declared = sweep_keys(read_sweep_overrides(sweep_dir), params)
    order: list[str] = []
    values: dict[str, set] = {}
    with_overrides = [job for job in jobs if job.overrides]  # a dir without .hydra/ says nothing
    for job in with_overrides:
        for key, value in job.overrides:
            if key not in values:
                order.append(key)
                values[key] = set()
            values[key].add(value)
    for key in order:  # a key missing from some job also varies
        if any(key not in dict(job.overrides) for job in with_overrides):
            values[key].add(None)
    return [k for k in order if k in declared or len(values[k]) > 1] + sorted(declared - set(order))


def fixed_overrides(jobs: list[Job], swept: list[str]) -> list[str]:
    if not jobs:
        return []
    first = jobs[0]
    common = [raw for raw, (k, _) in zip(first.raw_overrides, first.overrides, strict=False) if k not in swept]
    return [c for c in common if all(c in j.raw_overrides for j in jobs[1:])]


# ------------------------------------------------------------------------------------------------ rows


def _num(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def ranking_key(jobs: list[Job]) -> str:
    """What the sweep is ranked by: the sample-quality metric when the jobs logged one (the key most ok jobs
    have), else ``val/loss``. Lower is better for both."""
    keys = [j.quality_key for j in jobs if j.ok and j.quality_key]
    return max(set(keys), key=keys.count) if keys else "val/loss"


def build_rows(jobs: list[Job], swept: list[str]) -> tuple[list[str], list[dict[str, Any]]]:
    n_levels = max((len(j.per_sigma_losses()) for j in jobs), default=0)
    has_fid = any("val/fid" in j.metrics for j in jobs)
    rank_by = ranking_key(jobs)
    quality_cols = sorted({k for j in jobs for k in j.metrics if k.startswith("quality/")},
                          key=lambda k: (k != rank_by, k))
    band_cols = sorted({k for j in jobs for k in j.metrics if k.startswith("val/loss_band_")})
    columns = ["job", *swept, "status", "rank", *quality_cols, "val/loss", "val_ema/loss", "val/zero_output_loss",
               "val/loss_to_zero_output", "val/output_ms", "train/grad_norm", "collapse", *band_cols,
               *[f"val/loss_sigma_{i}" for i in range(n_levels)]]
    columns += (["val/fid"] if has_fid else []) + ["train/loss", "images_per_second", "global_step",
                                                   "train_seconds", "error", "dir"]
    rows = []
    for job in jobs:
        ov = dict(job.overrides)
        m = job.metrics
        record = job.record or {}
        row: dict[str, Any] = {"job": job.num if job.num is not None else job.path.name}
        row.update({k: ov.get(k, "") for k in swept})
        row["status"] = "ok" if job.ok else "failed"
        for key in (*quality_cols, "val/loss", "val_ema/loss", "val/zero_output_loss", "val/loss_to_zero_output",
                    "val/output_ms", "train/grad_norm", *band_cols):
            row[key] = _num(m.get(key))
        warnings = record.get("warnings") or []
        row["collapse"] = warnings[-1] if warnings else ""
        for i, v in enumerate(job.per_sigma_losses()):
            row[f"val/loss_sigma_{i}"] = _num(v)
        if has_fid:
            row["val/fid"] = _num(m.get("val/fid"))
        row["train/loss"] = _num(m.get("train/loss"))
        row["images_per_second"] = _num(record.get("images_per_second"))
        row["global_step"] = record.get("global_step")
        row["train_seconds"] = _num(record.get("train_seconds"))
        row["error"] = job.error or ""
        row["dir"] = job.path.name
        rows.append({c: row.get(c) for c in columns})
    scored = sorted((r for r in rows if r["status"] == "ok" and r.get(rank_by) is not None), key=lambda r: r[rank_by])
    for rank, row in enumerate(scored, 1):
        row["rank"] = rank
    return columns, rows


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def job_label(job: Job, swept: list[str]) -> str:
    ov = dict(job.overrides)
    parts = [f"{k.rsplit('.', 1)[-1] if len(swept) > 2 else k}={ov[k]}" for k in swept if k in ov]
    head = f"job {job.num if job.num is not None else job.path.name}"
    return head + (": " + ", ".join(parts) if parts else "")


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
        pairs = [(s, v) for s, v in zip(job.sigmas, losses, strict=False) if _num(v) is not None and s > 0]
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
        if key and _num(job.metrics.get(key)) is not None:
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
    level_cols = [c for c in columns if SIGMA_KEY.match(c)]
    shown = [c for c in columns if c != "dir" and (c not in level_cols or len(level_cols) <= 12)]
    out.append("| " + " | ".join(shown) + " |")
    out.append("|" + "|".join("---" for _ in shown) + "|")
    for row in sorted(rows, key=lambda r: (r.get("rank") is None, r.get("rank") or 0)):
        cells = [_fmt(row.get(c)).replace("|", "\\|") for c in shown]
        out.append("| " + " | ".join(cells) + " |")
    if len(level_cols) > 12:
        out.append(f"\n{len(level_cols)} per-level losses (val/loss_sigma_i, i = 0 is the largest σ): "
                   "see report.csv.")
    else:
        out.append("\nval/loss_sigma_i: validation loss at level i (i = 0 is the largest σ).")
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
    parser = argparse.ArgumentParser(prog="python -m ncsn.report", description=__doc__.splitlines()[0])
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
