"""EMA under the DDP strategies we ship (``ddp_spawn`` as ``trainer=ddp_sim``, and plain ``ddp``), 2 CPU
processes, the CPU recipe's EMA (decay 0.995, from step 0 so that a few steps move it): train, checkpoint,
resume. On every rank the module holds the raw weights and the average the EMA weights, the checkpoints hold
them as ``current_model_state`` and ``state_dict``, a resume restores them there, and the console has no
per-key ``sync_dist`` warnings. Slow: each run starts two processes (about a minute here)."""

from __future__ import annotations

import pytest
import torch
from conftest import ROOT, run_entry

CPU_EMA = ["experiment=cpu", "trainer.max_time=null", "data.batch_size=8", "trainer.limit_val_batches=1",
           "trainer.val_check_interval=2", "trainer.check_val_every_n_epoch=null",
           "callbacks.ema.update_starting_at_step=0", "callbacks.model_checkpoint.every_n_train_steps=2",
           "callbacks.progress_bar=null", "callbacks.sample_grid=null", "logger=csv"]
STRATEGIES = {"ddp_sim": ["trainer=ddp_sim"],
              "ddp": ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]}


def train(run_dir, probe_dir, *overrides):
    result = run_entry("train.py", *CPU_EMA, *overrides, f"+callbacks.probe={{_target_:fakes.WeightsProbe,"
                       f"out_dir:{probe_dir}}}", f"hydra.run.dir={run_dir}",
                       env={"PYTHONPATH": str(ROOT / "tests")}, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "It is recommended to use" not in result.stdout + result.stderr
    return result


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_ema_trains_checkpoints_and_resumes_with_weights_in_place_on_every_rank(strategy, tmp_path):
    run = tmp_path / "run"
    train(run, tmp_path / "probe1", *STRATEGIES[strategy], "trainer.max_steps=3")
    first = load(run / "checkpoints" / "last.ckpt")
    assert first["global_step"] == 3 and int(first["averaging_state"]["n_averaged"]) == 3
    assert not same(first["state_dict"], first["current_model_state"])
    for rank in (0, 1):
        end = load(tmp_path / "probe1" / f"end_rank{rank}.pt")
        assert end["step"] == 3
        assert same(end["module"], first["current_model_state"]), f"rank {rank}: raw weights"
        assert same(end["average"], first["state_dict"]), f"rank {rank}: EMA weights"
    assert "val_ema/loss" in (run / "metrics.json").read_text()

    resumed = tmp_path / "resumed"
    train(resumed, tmp_path / "probe2", *STRATEGIES[strategy], "trainer.max_steps=5",
          f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}")
    for rank in (0, 1):
        start = load(tmp_path / "probe2" / f"start_rank{rank}.pt")
        assert same(start["module"], first["current_model_state"]), f"rank {rank} resumed from the wrong weights"
        assert same(start["average"], first["state_dict"]), f"rank {rank} lost its average"
    last = load(resumed / "checkpoints" / "last.ckpt")
    end = load(tmp_path / "probe2" / "end_rank1.pt")
    assert last["global_step"] == 5 and int(last["averaging_state"]["n_averaged"]) == 5
    assert same(end["module"], last["current_model_state"]) and same(end["average"], last["state_dict"])
