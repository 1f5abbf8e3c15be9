"""The CPU recipe's training step through the app vs a plain PyTorch loop on the same network, in one run.

    python bench/cpu_step.py [--steps 300] [--threads 2] [-- Hydra overrides for both, e.g. model.net.ngf=8]

Both sides build the same ``experiment=cpu`` model from its config (network, σ list, Adam + warm-up, clip 1)
and run ``--steps`` optimizer steps at the recipe's batch size, after ``--warmup`` steps that are not timed:

* **plain**: ``ScoreModel.compute_loss`` on random batches of the bundled training digits held in memory (already
  dequantised), ``backward``, ``clip_grad_norm_(1.0)``, ``Adam.step``, ``LinearLR.step`` — forward, backward and
  optimizer only, nothing else;
* **app**: ``ncsn.app.train.train`` with the recipe's callbacks and logger as shipped (W&B offline, progress bar,
  LR monitor, metrics file, EMA — updated from step 0, as it is for 90 % of the recipe's steps), without
  validation and sample passes (timed apart by the app itself): its steps/s is ``metrics.json``'s
  ``images_per_second / batch`` (training time only, first step excluded).

Both loops run under each of PyTorch's CPU kernel sets this CPU offers (AVX-512 and AVX2 on an AVX-512 CPU;
``ncsn.app.cpu_kernels``), each set in its own process (torch reads the choice once, at start), the sets interleaved
repeat by repeat. Prints per set both rates and their ratio (the issue-20 target: the app within 10 % of the plain
loop), and the sets' ratios (issue 37); ``--kernels current`` runs both loops once in this process, with the kernels
its environment gives (``ATEN_CPU_CAPABILITY`` / ``ONEDNN_MAX_CPU_ISA``), then the split of one app step by cProfile
when ``--profile`` is given. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("train", overrides=["experiment=cpu", *overrides])


def plain_steps_per_second(overrides: list[str], steps: int, warmup: int, seed: int = 0) -> float:
    import torch

    from ncsn.app.common import instantiate

    cfg = compose(overrides)
    torch.manual_seed(seed)
    model = instantiate(cfg.model)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    train_set = datamodule.train_set
    data = torch.stack([train_set[i][0] for i in range(len(train_set))])
    optimizer, scheduler = model.optimizer_and_scheduler()
    clip = cfg.trainer.get("gradient_clip_val")
    batch = int(cfg.data.batch_size)
    model.train()
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        x = data[torch.randint(len(data), (batch,))]
        out = model.compute_loss(x)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(clip))
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return steps / (time.perf_counter() - start)


def app_steps_per_second(overrides: list[str], steps: int, warmup: int, out_dir: Path, profile: bool) -> float:
    from ncsn.app import train as training

    cfg = compose([*overrides, f"trainer.max_steps={steps + warmup}", "trainer.max_time=null",
                   "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
                   "callbacks.sample_grid=null", "callbacks.model_checkpoint=null",
                   "callbacks.ema.update_starting_at_step=0", f"paths.output_dir={out_dir}"])
    if profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        training.train(cfg)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    else:
        training.train(cfg)
    record = json.loads((out_dir / "metrics.json").read_text())
    return record["images_per_second"] / int(cfg.data.batch_size)


def run_here(args: argparse.Namespace, overrides: list[str]) -> dict:
    """Both loops ``args.repeats`` times in this process (plain, app alternating); the best of each."""
    import torch

    torch.set_num_threads(args.threads)
    plain, app = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            plain.append(plain_steps_per_second(overrides, args.steps, args.warmup))
            app.append(app_steps_per_second(overrides, args.steps, args.warmup, Path(tmp) / f"app{r}",
                                            args.profile and r == args.repeats - 1))
    return {"capability": torch.backends.cpu.get_cpu_capability(), "plain": plain, "app": app}


def run_kernel_sets(args: argparse.Namespace, overrides: list[str]) -> dict[str, dict]:
    """Both loops under each kernel set this CPU offers, one process per set and repeat, the sets interleaved."""
    from ncsn.app.cpu_kernels import kernel_env, offered_kernel_sets

    sets = offered_kernel_sets()
    if not sets:
        return {"current": run_here(args, overrides)}
    runs: dict[str, dict] = {k.label: {"plain": [], "app": []} for k in sets}
    cmd = [sys.executable, __file__, "--kernels", "current", "--json", "--repeats", "1", "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--threads", str(args.threads), "--", *overrides]
    for _ in range(args.repeats):
        for kset in sets:
            result = subprocess.run(cmd, env=kernel_env(kset), capture_output=True, text=True, check=False)
            if result.returncode != 0:
                sys.exit(f"{kset.label} run failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
            record = json.loads(result.stdout.strip().splitlines()[-1])
            if record["capability"] != kset.capability:
                sys.exit(f"asked for {kset.label} kernels, torch ran {record['capability']}")
            runs[kset.label]["plain"] += record["plain"]
            runs[kset.label]["app"] += record["app"]
    return runs


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="alternate plain/app this many times; best of each")
    parser.add_argument("--kernels", choices=("all", "current"), default="all",
                        help="all: every CPU kernel set this CPU offers, one process each; current: this process's")
    parser.add_argument("--profile", action="store_true", help="cProfile the last app run (top 25 by own time; "
                        "with --kernels current)")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # one JSON line (a child run)
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    if args.kernels == "current":
        record = run_here(args, overrides)
        if args.json:
            print(json.dumps(record))
            return 0
        runs = {record["capability"]: record}
    else:
        runs = run_kernel_sets(args, overrides)
    print(f"\nexperiment=cpu {' '.join(overrides)} | {args.steps} steps, {args.threads} threads, best of "
          f"{args.repeats} per kernel set")
    best = {name: (max(r["plain"]), max(r["app"])) for name, r in runs.items()}
    for name, r in runs.items():
        plain, app = best[name]
        print(f"{name:8s} plain loop: {plain:6.2f} steps/s (runs: {', '.join(f'{v:.2f}' for v in r['plain'])})   "
              f"app: {app:6.2f} steps/s (runs: {', '.join(f'{v:.2f}' for v in r['app'])})   "
              f"app / plain: {app / plain:.3f}")
    names = list(best)
    for other in names[1:]:
        print(f"{other} / {names[0]}: plain loop {best[other][0] / best[names[0]][0]:.3f}x, "
              f"app {best[other][1] / best[names[0]][1]:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
