"""The CPU recipe's training step through the app vs a plain PyTorch loop on the same network, in one run.

    python bench/cpu_step.py [--steps 300] [--threads 2] [-- Hydra overrides for both, e.g. model.net.ngf=8]

Both sides build the same ``experiment=cpu`` model from its config (network, σ list, Adam + warm-up, clip 1)
and run ``--steps`` optimizer steps at the recipe's batch size, after ``--warmup`` steps that are not timed:

* **plain**: ``ScoreModel.compute_loss`` on random batches of the bundled training digits held in memory (already
  dequantised), ``backward``, ``clip_grad_norm_(1.0)``, ``Adam.step``, ``LinearLR.step`` — forward, backward and
  optimizer only, nothing else;
* **app**: ``ncsn.training.train`` with the recipe's callbacks and logger as shipped (W&B offline, progress bar,
  LR monitor, metrics file, EMA — updated from step 0, as it is for 90 % of the recipe's steps), without
  validation and sample passes (timed apart by the app itself): its steps/s is ``metrics.json``'s
  ``images_per_second / batch`` (training time only, first step excluded).

Prints both rates and their ratio (the issue-20 target: the app within 10 % of the plain loop), then the
split of one app step by cProfile when ``--profile`` is given. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
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

    from ncsn.app import instantiate

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
    from ncsn import training

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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="alternate plain/app this many times; best of each")
    parser.add_argument("--profile", action="store_true", help="cProfile the last app run (top 25 by own time)")
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    import torch

    torch.set_num_threads(args.threads)
    plain, app = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            plain.append(plain_steps_per_second(overrides, args.steps, args.warmup))
            app.append(app_steps_per_second(overrides, args.steps, args.warmup, Path(tmp) / f"app{r}",
                                            args.profile and r == args.repeats - 1))
    best_plain, best_app = max(plain), max(app)
    print(f"\nexperiment=cpu {' '.join(overrides)} | {args.steps} steps, {args.threads} threads, best of "
          f"{args.repeats}")
    print(f"plain loop: {best_plain:.2f} steps/s   (runs: {', '.join(f'{v:.2f}' for v in plain)})")
    print(f"app       : {best_app:.2f} steps/s   (runs: {', '.join(f'{v:.2f}' for v in app)})")
    print(f"ratio app / plain: {best_app / best_plain:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
