"""The lines ``train.py`` prints when a run ends (rank zero): the last sample grid, its quality, the checkpoint and
the command that samples from it, as lines a user can copy."""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import sys
from pathlib import Path

import lightning as L

from ncsn.app.common import _in_multirun

log = logging.getLogger("ncsn")


def shown(path: Path) -> str:
    """``path`` relative to the working dir when inside it, else absolute."""
    path = path.absolute()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def final_checkpoint(trainer: L.Trainer) -> Path | None:
    """The run's last.ckpt (it holds the final step: ncsn.app.checkpoints.FinalStepCheckpoint), else the last saved."""
    callback = trainer.checkpoint_callback
    if callback is None or not getattr(callback, "dirpath", None):
        return None
    ckpt = Path(callback.dirpath) / "last.ckpt"
    if not ckpt.is_file():
        ckpt = Path(callback.last_model_path) if callback.last_model_path else None
    return ckpt if ckpt is not None and ckpt.is_file() else None


def sample_command(ckpt: Path) -> str:
    """The command that samples from ``ckpt``: ``python`` when it is this interpreter (an activated venv), else this
    interpreter's path (``make train``), and the sample.py beside train.py."""
    on_path = shutil.which("python")
    python = ("python" if on_path and Path(on_path).absolute().parent == Path(sys.executable).absolute().parent
              else shown(Path(sys.executable)))
    sample_py = next((p for p in (Path(sys.argv[0]).absolute().with_name("sample.py"), Path.cwd() / "sample.py",
                                  Path(__file__).resolve().parents[3] / "sample.py") if p.is_file()),
                     Path("sample.py"))
    return f"{python} {shown(sample_py)} ckpt_path={shlex.quote(str(ckpt.resolve()))} num_samples=256"


def print_closing_lines(trainer: L.Trainer, run_dir: Path, metric_name: str | None, value: float | None) -> None:
    """Print the closing lines; log ``optimized_metric`` when the quality line does not already show it."""
    from ncsn.app.callbacks import SampleGridCallback

    lines = []
    grids = sorted(p for cb in trainer.callbacks if isinstance(cb, SampleGridCallback)
                   for p in (Path(trainer.default_root_dir) / cb.dirname).glob("step_*.png"))
    if grids:
        lines.append(f"samples grid:   {grids[-1].resolve()}")
    try:  # written by the training process (under ddp_spawn this process's trainer did not train)
        record = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        record = {}
    quality = record.get("quality") or {}
    last = (quality.get("history") or [{}])[-1]
    quality_key = quality.get("metric")
    if quality_key in last:
        final = last.get("step") == record.get("global_step", trainer.global_step)
        when = "final samples" if final else f"samples at step {last.get('step')}"
        lines.append(f"sample quality: {quality_key} {last[quality_key]:.3g} ({when}; lower is better)")
    if metric_name and (metric_name != quality_key or _in_multirun()):
        log.info("optimized_metric %s = %s", metric_name, "(not logged)" if value is None else f"{float(value):.5g}")
    ckpt = final_checkpoint(trainer)
    if ckpt is not None:
        lines.append(f"checkpoint:     {ckpt.resolve()}")
        lines.append(f"sample from it: {sample_command(ckpt)}")
    if lines:
        print("\n".join(lines), flush=True)
