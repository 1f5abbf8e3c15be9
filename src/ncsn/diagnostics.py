"""Is the network learning? Plain functions over a score model and tensors (no Lightning, no Hydra).

A score network trained with too large a step can collapse to a constant (zero) output within a few Adam
steps and stay there: its DSM loss is then exactly the loss of a zero score, ½ σ^(p-2) ‖z‖² per sample
(D/2 for λ(σ) = σ², D = pixels; 392 on MNIST). ``ncsn.losses.dsm_loss`` returns that reference and the mean
square of the σ-scaled score σ·s with every batch, so a run can compare the two without extra passes.

* :func:`collapse_warning`: the one warning line a run prints (and records) when its network has collapsed.
* :func:`heldout_metrics`: the DSM loss on fixed held-out data and fixed noise, next to the zero-output loss.
* :func:`probe_learning`: a few optimizer steps of a real model with its real optimizer and schedule, with
  the held-out metrics along the way: how ``bench/learns.py`` and the recipe tests check that a shipped
  recipe learns at the width it ships.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

import torch

#: a validation loss within this fraction of the zero-output loss counts as "learned nothing"
NEAR_ZERO_OUTPUT = 0.05
#: a σ-scaled score whose mean square is below this is a constant (zero) output
COLLAPSED_OUTPUT_MS = 1e-3


def grad_norm(parameters: Iterable[torch.Tensor]) -> torch.Tensor:
    """The global 2-norm of the gradients, as a tensor (no host sync)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads, norm_type=2.0)


def collapse_warning(step: int, val_loss: float, zero_output_loss: float, output_ms: float,
                     lr: float | None = None) -> str | None:
    """One warning line when the network looks collapsed, else None.

    Collapsed: the σ-scaled score's mean square is below ``COLLAPSED_OUTPUT_MS`` (a constant output), or the
    held-out loss is within ``NEAR_ZERO_OUTPUT`` of the zero-output loss (the network predicts nothing).
    """
    if not all(math.isfinite(v) for v in (val_loss, zero_output_loss, output_ms)) or zero_output_loss <= 0:
        return None
    ratio = val_loss / zero_output_loss
    constant = output_ms < COLLAPSED_OUTPUT_MS
    if not constant and ratio < 1.0 - NEAR_ZERO_OUTPUT:
        return None
    what = (f"the network output has collapsed to a constant (mean square of sigma*score {output_ms:.2g})"
            if constant else "the network has learned nothing yet")
    rate = f" ({lr:.3g})" if lr is not None else ""
    return (f"{what} at step {step}: val/loss {val_loss:.4g} is {ratio:.0%} of the zero-output loss "
            f"{zero_output_loss:.4g}; likely cause: a learning rate{rate} too high for this network width "
            f"(try model.optimizer.lr=1e-4, a warm-up in model.scheduler, or trainer.gradient_clip_val=1)")


def health_metrics(step: int, val_loss: float, zero_output: float, output_ms: float, lr: float | None,
                   check: bool) -> tuple[dict[str, float], str | None]:
    """The collapse metrics of one validation and, when ``check`` and the network has collapsed, the warning
    line (``collapse_warning``); ``val/collapsed`` is 1 exactly when the line is returned."""
    line = collapse_warning(step, val_loss, zero_output, output_ms, lr) if check else None
    return ({"val/zero_output_loss": zero_output, "val/loss_to_zero_output": val_loss / zero_output,
             "val/output_ms": output_ms, "val/collapsed": float(line is not None)}, line)


@torch.no_grad()
def heldout_metrics(loss_fn: Callable, x: torch.Tensor, *, batch_size: int = 64, seed: int = 0) -> dict:
    """DSM loss of ``loss_fn(x, generator)`` (a ``ScoreModel.compute_loss``) over held-out ``x`` with fixed
    noise and levels (``seed``): ``loss``, ``zero_output_loss`` and ``output_ms`` per sample."""
    total = zero = out_sq = 0.0
    generator = torch.Generator(device=x.device).manual_seed(seed)
    for start in range(0, len(x), batch_size):
        out = loss_fn(x[start:start + batch_size], generator)
        total += float(out.level_sum.sum())
        zero += float(out.zero_output_sum)
        out_sq += float(out.output_sq_sum)
    n = len(x)
    return {"loss": total / n, "zero_output_loss": zero / n, "output_ms": out_sq / n}


def probe_learning(model, train_x: torch.Tensor, heldout_x: torch.Tensor, *, steps: int, batch_size: int,
                   eval_at: Iterable[int] = (), gradient_clip_val: float | None = None, seed: int = 0,
                   log: Callable[[dict], None] | None = None) -> list[dict]:
    """Train ``model`` (a ``ncsn.app.module.ScoreModel``) for ``steps`` steps on random batches of ``train_x`` with
    the optimizer and LR schedule of its own ``configure_optimizers`` (and Lightning's norm clipping when
    ``gradient_clip_val`` is set), measuring :func:`heldout_metrics` at step 0, at ``eval_at`` and at the end.

    Returns one record per evaluation: step, held-out metrics, the last train loss, gradient norm and lr.
    """
    optimizer, scheduler = model.optimizer_and_scheduler()
    torch.manual_seed(seed)  # the level and noise draws of the training steps
    generator = torch.Generator().manual_seed(seed)
    checkpoints = sorted({0, *(int(s) for s in eval_at if 0 < int(s) < steps), steps})
    records = []
    train_loss = norm = float("nan")
    start = time.perf_counter()
    step = 0
    for step in range(steps + 1):
        if step in checkpoints:
            model.eval()
            rec = {"step": step, **heldout_metrics(model.compute_loss, heldout_x, seed=seed + 1),
                   "train_loss": train_loss, "grad_norm": norm, "lr": optimizer.param_groups[0]["lr"],
                   "seconds": time.perf_counter() - start}
            records.append(rec)
            if log is not None:
                log(rec)
        if step == steps:
            break
        model.train()
        idx = torch.randint(len(train_x), (batch_size,), generator=generator)
        out = model.compute_loss(train_x[idx])
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        total = grad_norm(model.parameters())
        if gradient_clip_val:
            torch.nn.utils.clip_grad_norm_(model.parameters(), gradient_clip_val)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        train_loss, norm = float(out.loss.detach()), float(total)
    return records
