"""What a W&B dashboard of the default CPU recipe shows, read back from the offline run's own ``.wandb`` file
(tests/wandb_records.py), not through our logger calls: a quality curve, the per-σ chart after every
validation, a handful of per-σ bands instead of 95 scalars, and no fake zeros."""

from __future__ import annotations

import json
import re

from conftest import run_entry
from wandb_records import history, run_file

# the CPU recipe (95 levels, EMA, its logger: W&B offline), shortened: 3 validations, 2 sampling passes
SHORT_CPU = ["experiment=cpu", "trainer.max_time=null", "trainer.max_steps=60", "trainer.val_check_interval=20",
             "callbacks.sample_grid.every_n_steps=30", "callbacks.sample_grid.num_samples=16",
             "sampler.n_steps_each=1", "callbacks.progress_bar=null"]


def test_the_cpu_recipes_wandb_run_has_a_quality_curve_a_sigma_chart_and_no_fake_zeros(tmp_path):
    run_dir = tmp_path / "run"
    result = run_entry("train.py", *SHORT_CPU, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = history(run_file(run_dir))

    def steps_with(key):
        return [int(r["trainer/global_step"]) for r in rows if key in r]

    # the quality curve: the digit metric at both sampling passes, with its floor and class shares
    assert steps_with("quality/fd_ratio") == [30, 60]
    for row in (r for r in rows if "quality/fd_ratio" in r):
        assert row["quality/fd_ratio"] > 1.0 and row["quality/fd_floor"] > 0 and 0 <= row["quality/degenerate"] <= 1
        assert abs(row["quality/fd"] / row["quality/fd_floor"] - row["quality/fd_ratio"]) < 1e-6
    assert len(steps_with("samples/grid/filenames")) == 2  # one sampling pass serves the grid and the metric
    # the per-σ chart after each of the 3 validations
    assert len(steps_with("val/loss_vs_sigma_table/path")) == 3
    # per-σ loss: 5 bands, never a per-level key for 95 levels, and no value is a fake 0
    keys = {k for r in rows for k in r}
    assert not any(re.fullmatch(r"val/loss_sigma_\d+", k) for k in keys)
    assert {k for k in keys if k.startswith("val/loss_band_")} == {f"val/loss_band_{i}" for i in range(5)}
    for row in rows:
        for key, value in row.items():
            if key.startswith(("val/loss", "train/loss")) and isinstance(value, float):
                assert value > 0, (key, value)
    # the final value is in metrics.json, with the whole curve
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["quality"]["metric"] == "quality/fd_ratio"
    assert [h["step"] for h in record["quality"]["history"]] == [30, 60]
    assert record["metrics"]["quality/fd_ratio"] == record["quality"]["history"][-1]["quality/fd_ratio"]
    curve = record["per_sigma"]
    assert len(curve["sigma"]) == len(curve["loss"]) == 95 and sum(curve["count"]) == 64  # 2 batches of 32
    assert all((loss is None) == (count == 0) for loss, count in zip(curve["loss"], curve["count"]))
