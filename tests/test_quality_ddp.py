"""The sample-quality pass under ``trainer=ddp_sim`` (Lightning's ``ddp_spawn``, 2 CPU processes), as issue 24 asks:
rank 0 samples, every rank gets the values (so ``ModelCheckpoint(monitor="quality/kid")`` works on every rank), and
``checkpoints/best.ckpt`` holds the best pass, with its step and value in ``metrics.json``. Slow: two processes."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ROOT, run_entry

SHORT = ["experiment=cpu", "trainer=ddp_sim", "trainer.max_steps=40", "trainer.max_time=null",
         "trainer.val_check_interval=20", "callbacks.sample_grid.every_n_steps=20",
         "callbacks.sample_grid.num_samples=16", "sampler.num_levels=3", "sampler.step_lr=1e-4",
         "callbacks.progress_bar=null", "logger=csv"]


@pytest.mark.slow
def test_quality_on_every_rank_and_the_best_checkpoint_under_ddp_sim(tmp_path):
    run, probe = tmp_path / "run", tmp_path / "probe"
    result = run_entry("train.py", *SHORT, f"+callbacks.probe={{_target_:fakes.QualityProbe,out_dir:{probe}}}",
                       f"hydra.run.dir={run}", env={"PYTHONPATH": str(ROOT / "tests")}, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((probe / f"quality_rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] and "quality/kid" in ranks[0]
    record = json.loads((run / "metrics.json").read_text())
    history = record["quality"]["history"]
    assert [h["step"] for h in history] == [20, 40]
    best = min(history, key=lambda h: h["quality/kid"])
    assert record["best_checkpoint"]["step"] == best["step"]
    assert record["best_checkpoint"]["value"] == pytest.approx(best["quality/kid"])
    names = {p.name for p in (run / "checkpoints").iterdir()}
    assert "best.ckpt" in names and not any(n.startswith("best-v") for n in names)
    assert torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)["global_step"] == \
        best["step"]
