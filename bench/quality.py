"""Sample quality per GPU-minute (issue 8): train each experiment for the same wall-clock budget through the
real app, sample from its last checkpoint, and score the samples. A benchmark, not a test.

    python bench/quality.py                                   # mnist_paper vs mnist, 5 min each, 1,000 samples
    python bench/quality.py --tiny                            # CPU smoke run of the whole pipeline (minutes)
    python bench/quality.py --run-dirs bench/.runs/mnist_X    # score existing runs, no training

For each experiment:

1. ``python train.py experiment=X logger=csv ++trainer.max_time=<budget> trainer.min_epochs=0
   callbacks.sample_grid=null callbacks.progress_bar=null trainer.enable_progress_bar=false
   callbacks.model_checkpoint.every_n_train_steps=0
   hydra.run.dir=bench/.runs/X_<timestamp> [--extra]``
   (the budget caps training by wall clock; the experiment's own ``max_steps`` still applies; the end-of-run
   sample grid is switched off because step 2 samples anyway; periodic checkpoints are switched off because
   Lightning 2.6 does not rewrite ``last.ckpt`` at the end of fit once a periodic save has written it, so a run
   stopped by the clock between two saves would be scored on stale weights);
2. ``python sample.py ckpt_path=<run>/checkpoints/last.ckpt num_samples=N ...`` → ``samples.npz`` (uint8);
3. the scores below, against the project's own 500 held-out bundled digits (``data=mnist_bundled``).

Definitions (images as uint8 / 255, so in [0, 1]):

* **degenerate**: pixel std < 0.10 (near-constant: blank or flat grey), or mean > 0.35, or more than 35 % of
  the pixels above 0.5 (white / grey blobs). Over the 5,000 real digits the std is ≥ 0.148 and the mean and
  the bright share are ≤ 0.31, so no real digit is flagged; the real rate is printed every run.
* **class shares**: the share of each digit among the NON-degenerate samples, by the digit classifier that
  ships with the package (``ncsn.metrics.digits``: a small CNN trained on the 4,500 training digits; its file's
  sha256 is checked on load and its held-out accuracy is printed).
* **Fréchet (feature)**: the Fréchet distance between Gaussians fitted to the classifier's 128-d penultimate
  features of ALL N samples and of the 500 held-out digits (an MNIST "FID"). **floor**: the same distance for
  N real training digits (a fixed random subset; all 4,500 when N > 4,500) against the same 500 held-out
  digits: what a perfect sampler would score at this sample count (Fréchet distances are biased upward at
  small N).

Targets (``--targets gpu``, issue 8): degenerate < 1 %, every class share within 10 % ± 3 %, Fréchet ≤ 3 × floor.
The CPU recipe's (``--targets cpu``, issue 20; the default for ``--experiments cpu``): degenerate < 2 %, every
class 10 % ± 4 %, Fréchet ≤ 3 × floor, at 256 samples:

    python bench/quality.py --experiments cpu --budget-seconds 660 --num-samples 256 --sample-batch-size 256 --threads 2

These scores are the package's own sample-quality metric for digits (``ncsn.metrics.quality.DigitQuality``:
``quality/degenerate``, ``quality/class_share_*``, ``quality/fd``, ``quality/fd_floor``, ``quality/fd_ratio``);
this script only trains, samples and tabulates. Runs go to ``bench/.runs/`` (git-ignored); a JSON of the results
is written next to the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ncsn.metrics import digits as dc
from ncsn.metrics.digit_quality import (
    DEGENERATE_BRIGHT_SHARE_MAX,
    DEGENERATE_MEAN_MAX,
    DEGENERATE_STD_MIN,
    DigitQuality,
    degenerate_mask,
)

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
RUNS_DIR = BENCH / ".runs"

# the package's degenerate-sample rule (calibrated on the 5,000 real digits: see the module docstring)
STD_MIN, MEAN_MAX, BRIGHT_SHARE_MAX = DEGENERATE_STD_MIN, DEGENERATE_MEAN_MAX, DEGENERATE_BRIGHT_SHARE_MAX

# targets: the GPU recipe's (issue 8/11, 5 GPU-minutes, 1,000 samples) and the CPU recipe's (issue 20: make train +
# 256 samples within 15 minutes on 2 cores): (degenerate share below, class share within 10% +-, Fréchet within x floor)
TARGETS = {"gpu": (0.01, 0.03, 3.0), "cpu": (0.02, 0.04, 3.0)}
DEGENERATE_MAX, CLASS_SHARE_TOL, FRECHET_FLOOR_FACTOR = TARGETS["gpu"]

TINY_BUDGET = 60
TINY_SAMPLES = 64
TINY_TRAIN_EXTRA = ["trainer.accelerator=cpu", "model.net.ngf=8", "data.batch_size=32",
                    "trainer.limit_val_batches=2"]
# raw weights: a 0.999 EMA of ~100 steps is still mostly the initial network
TINY_SAMPLE_EXTRA = ["sampler.n_steps_each=1", "device=cpu", "use_ema=false"]


# ---------------------------------------------------------------------------------------------- metrics
class Reference:
    """The package's digit metric (``DigitQuality``: shipped classifier, held-out statistics, floors) and the
    classifier's numbers for the report."""

    def __init__(self, num_samples: int, verbose: bool = True) -> None:
        self.quality = DigitQuality(num_samples)
        split = dc.bundled_split()
        self.info = {"test_accuracy": dc.accuracy(self.quality.model, split["val_images"], split["val_labels"]),
                     "recorded_accuracy": dc.HELD_OUT_ACCURACY, "num_train": len(split["train_labels"]),
                     "num_test": len(split["val_labels"]), "sha256": dc.WEIGHTS_SHA256, "path": str(dc.WEIGHTS_FILE)}
        self.real_degenerate = {"held-out": float(degenerate_mask(split["val_images"]).mean()),
                                "train": float(degenerate_mask(split["train_images"]).mean())}
        if verbose:
            print(f"digit classifier: held-out accuracy {self.info['test_accuracy']:.2%} on {self.info['num_test']} "
                  f"digits; {dc.WEIGHTS_FILE} (sha256 checked)", flush=True)

    def floor(self, n: int) -> float:
        """Fréchet distance of ``n`` random real training digits (fixed seed) to the held-out digits."""
        return self.quality.floor(n)[0]

    def score(self, samples: np.ndarray) -> dict:
        samples = np.asarray(samples)
        if samples.ndim == 4 and samples.shape[-1] != 1 or tuple(samples.shape[1:3]) != (28, 28):
            raise SystemExit(f"samples of shape {samples.shape} are not 28x28 grey digits")
        r = self.quality.score(samples)
        defined = None not in r["class_shares"]
        return {"num_samples": r["num_samples"], "degenerate": r["degenerate"], "class_shares": r["class_shares"],
                "min_share": r["class_share_min"] if defined else None,
                "max_share": r["class_share_max"] if defined else None,
                "frechet": r["fd"], "floor": r["fd_floor"], "floor_count": r["floor_count"], "ratio": r["fd_ratio"],
                "kid": r["kid"], "kid_std": r["kid_std"]}


def targets(result: dict, kind: str = "gpu") -> dict[str, bool]:
    degenerate_max, share_tol, floor_factor = TARGETS[kind]
    shares = result["class_shares"]
    return {
        f"degenerate < {degenerate_max:.0%}": result["degenerate"] < degenerate_max,
        f"classes 10% ± {share_tol:.0%}": None not in shares and all(abs(s - 0.1) <= share_tol for s in shares),
        f"Fréchet ≤ {floor_factor:g}× floor": result["ratio"] <= floor_factor,
    }


def targets_text(kind: str) -> str:
    degenerate_max, share_tol, floor_factor = TARGETS[kind]
    return (f"{kind} targets (degenerate < {degenerate_max:.0%}, every class 10% ± {share_tol:.0%}, "
            f"Fréchet within {floor_factor:g}× floor)")


# ---------------------------------------------------------------------------------------------- the app
def max_time_string(seconds: float) -> str:
    """Lightning's ``DD:HH:MM:SS`` for a whole number of seconds."""
    s = max(1, round(seconds))
    return f"{s // 86400:02d}:{s % 86400 // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def run_logged(cmd: list[str], log_path: Path, env: dict, timeout: float | None) -> tuple[int, float]:
    """Run ``cmd`` in the repository root with stdout + stderr to ``log_path``; returns (exit code, seconds)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n\n")
        log.flush()
        try:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                timeout=timeout, check=False).returncode
        except subprocess.TimeoutExpired:
            log.write(f"\n[bench] killed after {timeout:.0f} s\n")
            rc = 124
    return rc, time.perf_counter() - start


def tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def find_checkpoint(run_dir: Path) -> Path | None:
    ckpts = run_dir / "checkpoints"
    if (ckpts / "last.ckpt").is_file():
        return ckpts / "last.ckpt"
    steps = sorted(ckpts.glob("step_*.ckpt"))
    return steps[-1] if steps else None


def scored_checkpoints(run_dir: Path, every: bool) -> list[Path | None]:
    """The checkpoints to score: the last one (None), and with ``every`` each periodic ``step_*.ckpt`` first."""
    periodic = sorted((run_dir / "checkpoints").glob("step_*.ckpt")) if every else []
    return [*periodic, None]


def checkpoint_step(ckpt: Path) -> int | None:
    from ncsn.app.checkpoints import read_torch_file

    try:
        return int(read_torch_file(ckpt, mmap=True).get("global_step", -1))
    except Exception:  # noqa: BLE001 - sample.py reports an unreadable (or unsafe) checkpoint properly
        return None


def run_step(run_dir: Path) -> int | None:
    """``global_step`` at the end of the run, from ``metrics.json`` (None if missing)."""
    try:
        return int(json.loads((run_dir / "metrics.json").read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def train(experiment: str, run_dir: Path, budget: float, extra: list[str], env: dict) -> dict:
    cmd = [sys.executable, "train.py", f"experiment={experiment}", "logger=csv",
           f"++trainer.max_time='{max_time_string(budget)}'", "trainer.min_epochs=0",
           "callbacks.sample_grid=null", "callbacks.progress_bar=null", "trainer.enable_progress_bar=false",
           "callbacks.model_checkpoint.every_n_train_steps=0", f"hydra.run.dir={run_dir}", *extra]
    print(f"[{experiment}] training for {budget:.0f} s -> {run_dir}", flush=True)
    rc, seconds = run_logged(cmd, run_dir / "bench_train.log", env, timeout=2 * budget + 900)
    return {"train_rc": rc, "train_wall_s": seconds, "train_cmd": cmd}


def sample(ckpt: Path, out_dir: Path, num: int, batch: int, extra: list[str], env: dict) -> dict:
    cmd = [sys.executable, "sample.py", f"ckpt_path={ckpt}", f"num_samples={num}", f"batch_size={batch}",
           "progress=false", f"hydra.run.dir={out_dir}", *extra]
    rc, seconds = run_logged(cmd, out_dir / "bench_sample.log", env, timeout=None)
    return {"sample_rc": rc, "sample_wall_s": seconds, "sample_cmd": cmd}


def evaluate_run(name: str, run_dir: Path, ref: Reference, args, env: dict, record: dict,
                 ckpt: Path | None = None) -> dict:
    """Sample from ``ckpt`` (default: the run's last checkpoint) with ``sample.py`` and score the samples."""
    record.update(name=name, run_dir=str(run_dir))
    explicit = ckpt is not None
    ckpt = ckpt or find_checkpoint(run_dir)
    if ckpt is None:
        record["error"] = f"no checkpoint in {run_dir / 'checkpoints'}"
        return record
    record["checkpoint"] = str(ckpt)
    # "steps trained" = the step of the checkpoint that is scored. Lightning 2.6 does not rewrite last.ckpt at
    # the end of fit once a periodic step checkpoint wrote it, so a run stopped between periodic saves has a
    # stale last.ckpt: said loudly here (the bench's own runs switch periodic saves off to avoid it).
    record["steps"] = checkpoint_step(ckpt)
    record["run_final_step"] = run_step(run_dir)
    if (not explicit and None not in (record["steps"], record["run_final_step"])
            and record["steps"] != record["run_final_step"]):
        print(f"[{name}] WARNING: {ckpt.name} is from step {record['steps']} but the run ended at step "
              f"{record['run_final_step']}; scoring the checkpoint", file=sys.stderr, flush=True)
    metrics = run_dir / "metrics.json"
    if metrics.is_file():
        m = json.loads(metrics.read_text())
        record["train_seconds"] = m.get("train_seconds")
        record["val_loss"] = (m.get("metrics") or {}).get("val/loss")
    out_dir = run_dir / f"bench_samples_{ckpt.stem}_{args.num_samples}_{args.stamp}"
    print(f"[{name}] sampling {args.num_samples} images from {ckpt.name} ...", flush=True)
    record.update(sample(ckpt, out_dir, args.num_samples, args.sample_batch_size, args.sample_extra, env))
    npz = out_dir / "samples.npz"
    if record["sample_rc"] != 0 or not npz.is_file():
        record["error"] = f"sample.py failed (exit {record['sample_rc']}); see {out_dir / 'bench_sample.log'}"
        print(tail(out_dir / "bench_sample.log"), file=sys.stderr)
        return record
    with np.load(npz) as f:
        samples = f["samples"]
    record.update(ref.score(samples))
    record["targets"] = targets(record, getattr(args, "targets", "gpu"))
    record["samples_png"] = str(out_dir / "samples.png")
    print(f"[{name}] {record['steps']} steps, sampling {record['sample_wall_s']:.0f} s, degenerate "
          f"{record['degenerate']:.1%}, Fréchet {record['frechet']:.2f} (floor {record['floor']:.2f})", flush=True)
    return record


# ---------------------------------------------------------------------------------------------- report
def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def report(results: list[dict], ref: Reference, args) -> str:
    lines = [
        (f"digit classifier: held-out accuracy {ref.info['test_accuracy']:.2%} on {ref.info['num_test']} digits "
         f"(trained on {ref.info['num_train']})"),
        (f"real digits flagged degenerate: {pct(ref.real_degenerate['held-out'])} of the 500 held-out, "
         f"{pct(ref.real_degenerate['train'])} of the 4,500 training digits "
         f"(rule: std < {STD_MIN} or mean > {MEAN_MAX} or > {BRIGHT_SHARE_MAX:.0%} of pixels above 0.5)"),
        "Fréchet floor: N real training digits vs the 500 held-out digits, N = the sample count",
        "",
        ("| experiment | steps trained | degenerate % | min/max class share | per-class shares (0-9) "
         "| Fréchet (feature) | floor | ratio to floor |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | {r.get('steps', 'n/a')} | error: {r['error']} | | | | | |")
            continue
        shares = " ".join("n/a" if s is None else f"{100 * s:.0f}" for s in r["class_shares"])
        lines.append(f"| {r['name']} | {r['steps']} | {pct(r['degenerate'])} | {pct(r['min_share'])} / "
                     f"{pct(r['max_share'])} | {shares} | {r['frechet']:.2f} | {r['floor']:.2f} "
                     f"| {r['ratio']:.1f}× |")
    lines += ["", targets_text(args.targets) + ":"]
    for r in results:
        if "error" in r:
            lines.append(f"- {r['name']}: FAIL (no result: {r['error']})")
            continue
        checks = ", ".join(f"{k}: {'pass' if ok else 'FAIL'}" for k, ok in r["targets"].items())
        lines.append(f"- {r['name']}: {'PASS' if all(r['targets'].values()) else 'FAIL'} ({checks})")
    trained = ("existing runs, not trained by the bench" if args.run_dirs else
               f"budget {args.budget_seconds:.0f} s of training per experiment; extra training overrides: "
               f"{' '.join(args.extra) or 'none'}")
    lines.append(f"\n(N = {args.num_samples} samples per experiment; {trained}; sampling overrides: "
                 f"{' '.join(args.sample_extra) or 'none'})")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Sample quality per GPU-minute of NCSN MNIST recipes (issue 8).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--experiments", nargs="+", default=["mnist_paper", "mnist"],
                   help="conf/experiment names to train and score side by side")
    p.add_argument("--budget-seconds", type=float, default=None,
                   help="training wall clock per experiment (trainer.max_time); default 300, --tiny 60")
    p.add_argument("--num-samples", type=int, default=None, help="samples per experiment; default 1000, --tiny 64")
    p.add_argument("--sample-batch-size", type=int, default=None, help="sample.py batch_size; default 500")
    p.add_argument("--extra", nargs="*", default=[], help="Hydra overrides for every training run")
    p.add_argument("--sample-extra", nargs="*", default=[],
                   help="overrides for sample.py, e.g. sampler.n_steps_each=1 device=cpu use_ema=false")
    p.add_argument("--tiny", action="store_true",
                   help=f"CPU smoke run: {TINY_BUDGET} s, {' '.join(TINY_TRAIN_EXTRA)}, {TINY_SAMPLES} samples, "
                        f"{' '.join(TINY_SAMPLE_EXTRA)}")
    p.add_argument("--run-dirs", nargs="+", default=None, help="score these existing run dirs; no training")
    p.add_argument("--targets", choices=sorted(TARGETS), default=None,
                   help="which targets to check: gpu (1%%, ±3%%, 3x) or cpu (5%%, ±5%%, 5x); default cpu for "
                        "--experiments cpu, else gpu")
    p.add_argument("--every-checkpoint", action="store_true",
                   help="score every step_*.ckpt of each run too (quality vs training steps), not only the last")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS for the subprocesses (1 avoids thread thrashing on a busy CPU)")
    p.add_argument("--runs-dir", default=str(RUNS_DIR), help="where new runs go")
    args = p.parse_args(argv)
    if args.tiny:
        args.extra = [*TINY_TRAIN_EXTRA, *args.extra]
        args.sample_extra = [*TINY_SAMPLE_EXTRA, *args.sample_extra]
    if args.targets is None:
        args.targets = "cpu" if args.experiments == ["cpu"] else "gpu"
    if args.budget_seconds is None:
        args.budget_seconds = TINY_BUDGET if args.tiny else 300.0
    if args.num_samples is None:
        args.num_samples = TINY_SAMPLES if args.tiny else 1000
    if args.sample_batch_size is None:
        args.sample_batch_size = min(args.num_samples, 500)
    if args.budget_seconds <= 0 or args.num_samples < 2 or args.sample_batch_size < 1:
        p.error("--budget-seconds must be > 0, --num-samples >= 2, --sample-batch-size >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
        env["MKL_NUM_THREADS"] = str(args.threads)
    ref = Reference(args.num_samples)
    stamp = args.stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    results = []
    if args.run_dirs:
        for d in args.run_dirs:
            run_dir = Path(d).resolve()
            if not run_dir.is_dir():
                raise SystemExit(f"no such run dir: {run_dir}")
            for ckpt in scored_checkpoints(run_dir, args.every_checkpoint):
                name = run_dir.name if ckpt is None else f"{run_dir.name}/{ckpt.name}"
                results.append(evaluate_run(name, run_dir, ref, args, env, {}, ckpt))
    else:
        for exp in args.experiments:
            run_dir = (Path(args.runs_dir) / f"{exp}_{stamp}").resolve()
            if run_dir.exists():
                raise SystemExit(f"{run_dir} exists already; wait a second and run again")
            record = train(exp, run_dir, args.budget_seconds, args.extra, env)
            if record["train_rc"] != 0:
                print(f"[{exp}] train.py failed (exit {record['train_rc']}):\n{tail(run_dir / 'bench_train.log')}",
                      file=sys.stderr)
                if find_checkpoint(run_dir) is None:
                    results.append({**record, "name": exp, "run_dir": str(run_dir),
                                    "error": f"train.py failed (exit {record['train_rc']}); "
                                             f"see {run_dir / 'bench_train.log'}"})
                    continue
            results.append(evaluate_run(exp, run_dir, ref, args, env, record))
    text = report(results, ref, args)
    print("\n" + text)
    out = Path(args.runs_dir) / f"quality_{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "classifier": ref.info, "real_degenerate": ref.real_degenerate,
                               "results": results, "report": text}, indent=2, default=str) + "\n")
    print(f"\nresults: {out}")
    return 0 if results and all("error" not in r for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
