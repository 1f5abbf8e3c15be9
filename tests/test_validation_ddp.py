"""Validation under DDP (issue 26, defects 5 and 8), through Lightning's ``ddp_spawn`` with 2 CPU processes (what
``trainer=ddp_sim`` runs): the same (level, noise) pairs, hence the same losses, on 1 and on 2 devices; one
collective per validation for the losses (the explicit reduction), not one more per logged key; and the per-σ keys
are the fixed σ bins."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from fakes import CollectiveCounter, PlainDigits

from ncsn.app.module import ScoreModel
from ncsn.sigmas import geometric_sigmas, sigma_bin_key


def tiny_model(num_scales: int = 10) -> ScoreModel:
    from ncsn.nets import NCSN

    torch.manual_seed(0)
    return ScoreModel(NCSN(ngf=4, num_scales=num_scales), geometric_sigmas(1.0, 0.01, num_scales), [1, 28, 28])


def validate(tmp_path, devices: int, num_scales: int = 10) -> dict:
    """The validation metrics of rank 0 and every rank's collective counts."""
    out = tmp_path / f"d{devices}_L{num_scales}"
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[CollectiveCounter(str(out))])
    # 48 held-out digits, batches of 8 per device: 6 batches on 1 device; 3 batches of its 24 on each of 2 devices
    # (the global batch is 8 x devices)
    dm = PlainDigits("mnist_bundled", batch_size=8 * devices, val_size=48)
    trainer.validate(tiny_model(num_scales), datamodule=dm)
    return {rank: json.loads((out / f"collectives_rank{rank}.json").read_text()) for rank in range(devices)}


@pytest.mark.slow
def test_same_validation_on_one_and_two_devices_with_one_collective(tmp_path):
    one, two = validate(tmp_path, 1), validate(tmp_path, 2)
    assert two[0]["metrics"] == two[1]["metrics"]  # every rank holds the values (monitors work on each)
    assert set(one[0]["metrics"]) == set(two[0]["metrics"])
    for key, value in one[0]["metrics"].items():
        assert two[0]["metrics"][key] == pytest.approx(value, rel=1e-5), key
    print("collectives per validation (2 processes):", two[0]["counts"], two[0]["names"])
    # the one strategy.reduce of the summed losses (and Lightning's own barrier), not one all_reduce per logged key
    assert two[0]["names"] == two[1]["names"] == [["barrier", "all_reduce"]]


def test_per_sigma_keys_are_fixed_sigma_bins(tmp_path):
    """Two σ lists over the same range log the same keys, so a σ sweep overlays in W&B."""
    keys = []
    for num_scales in (10, 25):
        metrics = validate(tmp_path, 1, num_scales)[0]["metrics"]
        keys.append({k for k in metrics if k.startswith("val/loss_sigma")})
    assert keys[0] == keys[1] == {sigma_bin_key(s) for s in geometric_sigmas(1.0, 0.01, 10).tolist()}
    assert "val/loss_sigma_bin/0000.010-0000.020" in keys[0] and "val/loss_sigma_bin/0001.000-0002.000" in keys[0]
    assert not any(k.startswith(("val/loss_band_", "val/loss_sigma_0")) for k in keys[0])
