"""Runs many command lines of the project's CLIs in ONE process, each as its entry point runs it, and records
what a user would see: ``python tests/cli_matrix.py CASES.json RESULTS.json`` (used by tests/test_reliability.py).

Each case is ``{"id", "argv", "out"}``: ``argv`` is what follows ``python`` (``train.py ...``, ``sample.py ...``
or ``-m ncsn.<tool> ...``); the script is run with ``runpy`` as ``__main__``, as ``python`` would run it
(Hydra's own argument parsing, the pre-checks, the error handling); the cases share the process and its
imports. The result of a case: its exit code, stderr and the files under ``out`` afterwards. One process for
the whole matrix keeps it fast (a case that fails at its config takes a fraction of a second, a process start
takes seconds).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import signal
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


#: a case that is not rejected runs for real (a training run): stopped after this long, recorded as such
CASE_LIMIT_S = 120


class CaseTimeout(BaseException):
    """Raised in a case that ran past ``CASE_LIMIT_S`` (a mistake that was not caught: it started to work)."""


def _stop(signum, frame):
    raise CaseTimeout(f"still running after {CASE_LIMIT_S} s")


def run_case(argv: list[str]) -> tuple[object, str]:
    """Run one command line in this process; returns (exit code, stderr)."""
    saved_argv = sys.argv[:]
    err, out = io.StringIO(), io.StringIO()
    code: object = 0
    signal.signal(signal.SIGALRM, _stop)
    signal.alarm(CASE_LIMIT_S)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            if argv[0] == "-m":
                sys.argv = [argv[1], *argv[2:]]
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            else:
                sys.argv = [str(ROOT / argv[0]), *argv[1:]]
                runpy.run_path(str(ROOT / argv[0]), run_name="__main__")
    except SystemExit as exc:
        code = exc.code
    except BaseException as exc:  # noqa: BLE001 - recorded as what the user would have seen
        import traceback

        code = f"uncaught {type(exc).__name__}"
        err.write(traceback.format_exc())
    finally:
        signal.alarm(0)
        sys.argv = saved_argv
    return code, err.getvalue()


def files_under(path: str | None) -> list[str]:
    if not path or not Path(path).exists():
        return []
    root = Path(path)
    if not root.is_dir():
        return ["."]
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def main(cases_file: str, results_file: str) -> None:
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true")
    os.environ.pop("HYDRA_FULL_ERROR", None)
    # runpy's note that a module already imported (ncsn.sigmas, by an earlier case) is run again as __main__
    warnings.filterwarnings("ignore", message=".*found in sys.modules after import of package",
                            category=RuntimeWarning)
    results = {}
    for case in json.loads(Path(cases_file).read_text()):
        code, stderr = run_case(case["argv"])
        results[case["id"]] = {"code": code, "stderr": stderr, "files": files_under(case.get("out"))}
    Path(results_file).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
