"""Reading a Hydra sweep for ``ncsn.tools.report``: each job dir (``.hydra/overrides.yaml``, ``metrics.json``,
``error.txt``, ``checkpoints/config.yaml``, ``samples/step_*.png``) as a ``Job``, the swept keys, and the rows of the
report (one per job, ranked by the sample-quality metric when the jobs logged it, else ``val/loss``).

Per-σ validation losses are the fixed log-σ bins ``val/loss_sigma_bin/<lo>-<hi>`` (``ncsn.sigmas.sigma_bin_key``),
one column each, so runs with different σ lists share columns; the per-level curve comes from ``metrics.json``'s
``per_sigma``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ncsn.app.sweeps import override_items, read_sweep_overrides, sweep_keys
from ncsn.metrics.registry import quality_key_in
from ncsn.sigmas import SIGMA_BIN_PREFIX, sigma_bin_low

NO_METRICS = "no metrics.json (still running or killed)"
SIGMA_KEY = re.compile(r"^val/loss_sigma_(\d+)$")  # per-level keys of runs before the σ bins
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


def as_number(value: Any) -> float | None:
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


def sigma_bin_columns(jobs: list[Job]) -> list[str]:
    """The ``val/loss_sigma_bin/*`` keys any job logged, from the largest σ to the smallest."""
    keys = {k for j in jobs for k in j.metrics if k.startswith(SIGMA_BIN_PREFIX)}
    return sorted(keys, key=sigma_bin_low, reverse=True)


def build_rows(jobs: list[Job], swept: list[str]) -> tuple[list[str], list[dict[str, Any]]]:
    has_fid = any("val/fid" in j.metrics for j in jobs)
    rank_by = ranking_key(jobs)
    quality_cols = sorted({k for j in jobs for k in j.metrics if k.startswith("quality/")},
                          key=lambda k: (k != rank_by, k))
    bin_cols = sigma_bin_columns(jobs)
    columns = ["job", *swept, "status", "rank", *quality_cols, "val/loss", "val_ema/loss", "val/zero_output_loss",
               "val/loss_to_zero_output", "val/output_ms", "train/grad_norm", "collapse", *bin_cols]
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
                    "val/output_ms", "train/grad_norm", *bin_cols):
            row[key] = as_number(m.get(key))
        warnings = record.get("warnings") or []
        row["collapse"] = warnings[-1] if warnings else ""
        if has_fid:
            row["val/fid"] = as_number(m.get("val/fid"))
        row["train/loss"] = as_number(m.get("train/loss"))
        row["images_per_second"] = as_number(record.get("images_per_second"))
        row["global_step"] = record.get("global_step")
        row["train_seconds"] = as_number(record.get("train_seconds"))
        row["error"] = job.error or ""
        row["dir"] = job.path.name
        rows.append({c: row.get(c) for c in columns})
    scored = sorted((r for r in rows if r["status"] == "ok" and r.get(rank_by) is not None), key=lambda r: r[rank_by])
    for rank, row in enumerate(scored, 1):
        row["rank"] = rank
    return columns, rows


def format_cell(value: Any) -> str:
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
