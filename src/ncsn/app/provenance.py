"""What produced a run: package versions and the git commit, recorded in every run dir."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path


def git_commit(path: str | Path | None = None) -> str | None:
    """The commit of the git checkout holding ``path`` (this package by default), or None."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def run_info() -> dict:
    import lightning
    import torch

    import ncsn

    return {
        "ncsn": ncsn.__version__,
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "cuda": torch.version.cuda,
    }
