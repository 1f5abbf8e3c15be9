"""The LSUN and FFHQ experiments (value for value the official config files), one training step of their networks
through train.py from real-format files, and the README's three commands from a folder of images to samples."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch
from conftest import compose_train, run_entry
from fakes import write_ffhq, write_image_folder, write_lsun

pytest.importorskip("lmdb")

#: ermongroup/ncsnv2 configs/{church,bedroom,tower,ffhq}.yml (commit 1bcea03): data.image_size, model.sigma_begin /
#: sigma_end / num_classes, sampling.step_lr / n_steps_each / denoise, training.batch_size, optim.lr / eps,
#: model.ema_rate, training.n_iters - 1 (its last checkpoint), data.random_flip, data.category, and the network
#: runners/ncsn_runner.py get_model builds for the dataset
OFFICIAL = {
    "church_ncsnv2": {"image_size": 64, "sigma_1": 140, "sigma_L": 0.01, "L": 788, "step_lr": 4.9e-6, "T": 4,
                      "denoise": True, "batch": 128, "lr": 1e-4, "eps": 1e-8, "ema": 0.999, "steps": 200_000,
                      "flip": True, "category": "church_outdoor", "net": "NCSNv2Deeper"},
    "bedroom_ncsnv2": {"image_size": 128, "sigma_1": 190, "sigma_L": 0.01, "L": 1086, "step_lr": 1.8e-6, "T": 3,
                       "denoise": True, "batch": 128, "lr": 1e-4, "eps": 1e-8, "ema": 0.999, "steps": 150_000,
                       "flip": True, "category": "bedroom", "net": "NCSNv2Deeper"},
    "tower_ncsnv2": {"image_size": 128, "sigma_1": 190, "sigma_L": 0.01, "L": 1086, "step_lr": 1.8e-6, "T": 3,
                     "denoise": True, "batch": 128, "lr": 1e-4, "eps": 1e-8, "ema": 0.999, "steps": 150_000,
                     "flip": True, "category": "tower", "net": "NCSNv2Deeper"},
    "ffhq_ncsnv2": {"image_size": 256, "sigma_1": 348, "sigma_L": 0.01, "L": 2311, "step_lr": 9e-7, "T": 3,
                    "denoise": True, "batch": 32, "lr": 1e-4, "eps": 1e-3, "ema": 0.999, "steps": 80_000,
                    "flip": True, "category": None, "net": "NCSNv2Deepest"},
}
ADAM_EPS = inspect.signature(torch.optim.Adam).parameters["eps"].default
TINY_RUN = ["model.net.ngf=4", "data.image_size=16", "data.batch_size=2", "data.num_workers=0",
            "data.pin_memory=false", "logger=csv", "callbacks.progress_bar=null"]


@pytest.mark.parametrize("experiment", sorted(OFFICIAL))
def test_experiment_is_the_official_config_file_value_for_value(experiment):
    cfg = compose_train(f"experiment={experiment}")
    want = OFFICIAL[experiment]
    found = {
        "image_size": cfg.data.image_size, "sigma_1": cfg.sigmas.sigma_max, "sigma_L": cfg.sigmas.sigma_min,
        "L": cfg.sigmas.num_scales, "step_lr": cfg.sampler.step_lr, "T": cfg.sampler.n_steps_each,
        "denoise": cfg.sampler.denoise, "batch": cfg.data.batch_size, "lr": cfg.model.optimizer.lr,
        "eps": cfg.model.optimizer.get("eps", ADAM_EPS), "ema": cfg.callbacks.ema.decay,
        "steps": cfg.trainer.max_steps, "flip": cfg.data.random_flip, "category": cfg.data.get("category"),
        "net": cfg.model.net._target_.rsplit(".", 1)[-1],
    }
    assert found == want
    assert cfg.sampler.name == "ald" and cfg.model.net.ngf == 128 and cfg.run_name == experiment
    assert tuple(cfg.model.optimizer.betas) == (0.9, 0.999) and cfg.model.optimizer.weight_decay == 0.0


def test_one_training_step_of_each_network_from_lsun_and_ffhq_files(tmp_path):
    """train.py experiment=church_ncsnv2 (NCSNv2Deeper on an lmdb database) and ffhq_ncsnv2 (NCSNv2Deepest on a
    folder of PNGs), one training and one validation batch each, at ngf 4 on 16 x 16 images."""
    data = tmp_path / "data"
    write_lsun(data / "lsun")
    write_ffhq(data / "ffhq", n=20, size=24)
    sweep = tmp_path / "sweep"
    result = run_entry("train.py", "-m", "experiment=church_ncsnv2,ffhq_ncsnv2", "debug=fast_dev_run",
                       f"paths.data_dir={data}", *TINY_RUN, "callbacks.sample_grid=null",
                       f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert len(jobs) == 2
    for job in jobs:
        assert not (job / "error.txt").exists(), (job / "error.txt").read_text()
        record = json.loads((job / "metrics.json").read_text())
        assert record["global_step"] == 1
        assert record["metrics"]["val/loss"] is not None and record["metrics"]["val/loss"] > 0


@pytest.mark.slow
def test_from_a_folder_of_images_to_samples_with_the_readmes_three_commands(tmp_path, capsys):
    """README "Your own images": the σ helper on the folder, train.py with what it printed, sample.py (about a
    minute: three processes)."""
    from ncsn.tools.sigma_helper import main as sigmas_main

    folder = tmp_path / "pictures"
    write_image_folder(folder)
    result = run_entry("train.py", "experiment=cifar10_ncsnv2", "data=image_folder", f"data.path={tmp_path / 'no'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: image folder {tmp_path / 'no'} does not exist; set data.path=<folder of images>")

    sigmas_main(["suggest", "data=image_folder", f"data.path={folder}", "data.image_size=16", "steps_each=2"])
    printed = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert printed[0] == "sigmas=geometric" and printed[-2].startswith("sampler.n_steps_each=")
    run_dir = tmp_path / "run"
    result = run_entry("train.py", "experiment=cifar10_ncsnv2", "data=image_folder", f"data.path={folder}",
                       *printed, *TINY_RUN, "data.val_fraction=0.34", "trainer.max_steps=2",
                       "trainer.accelerator=cpu", "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0",
                       "callbacks.sample_grid=null", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    samples_dir = tmp_path / "samples"
    result = run_entry("sample.py", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "num_samples=3",
                       "batch_size=3", "progress=false", f"hydra.run.dir={samples_dir}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    samples = np.load(samples_dir / "samples.npz")["samples"]
    assert samples.shape == (3, 16, 16, 3) and samples.dtype == np.uint8 and samples.std() > 0
