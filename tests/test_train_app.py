"""The training application through the real train.py: configs, datasets on disk, checkpoints, grids,
W&B, resume, DDP."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch
from conftest import EMA_ON, ROOT, TINY, compose_train, run_entry
from fakes import write_celeba, write_cifar, write_mnist
from hydra import compose, initialize_config_dir
from PIL import Image

from ncsn.app.common import instantiate

EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_builds_module_and_datamodule(experiment, tmp_path):
    cfg = compose_train(f"experiment={experiment}", f"paths.data_dir={tmp_path}")
    model = instantiate(cfg.model)
    datamodule = instantiate(cfg.data)
    assert model.sigmas.shape == (cfg.sigmas.num_scales,)
    assert torch.all(model.sigmas[:-1] > model.sigmas[1:])
    assert {k: model.sampler_settings[k] for k in ("name", "init_low", "init_high")} == {
        k: cfg.sampler[k] for k in ("name", "init_low", "init_high")}
    assert all(model.sampler_settings[k] == v for k, v in cfg.sampler.items() if k in model.sampler_settings)
    assert datamodule.hparams is not None or datamodule is not None
    if experiment.endswith("_paper"):  # the paper's recipe, exactly
        assert (cfg.sigmas.sigma_max, cfg.sigmas.sigma_min, cfg.sigmas.num_scales) == (1.0, 0.01, 10)
        assert (cfg.sampler.n_steps_each, cfg.sampler.step_lr) == (100, 2e-5)
        assert cfg.model.optimizer.lr == 1e-3 and cfg.data.batch_size == 128
        assert cfg.trainer.max_steps == 200_000 and cfg.callbacks.ema is None
        assert cfg.model.net.ngf == (64 if experiment.startswith("mnist") else 128)


def test_paper_networks_have_the_papers_size():
    mnist = instantiate(compose_train("experiment=mnist_paper").model)
    cifar = instantiate(compose_train("experiment=cifar10_paper", "paths.data_dir=/nowhere").model)
    assert sum(p.numel() for p in mnist.net.parameters()) == 7_638_657
    assert sum(p.numel() for p in cifar.net.parameters()) == 30_117_635


def test_fast_dev_run_reads_mnist_cifar10_celeba_from_their_real_formats(tmp_path):
    data = tmp_path / "data"
    write_mnist(data, n_train=8, n_test=4)
    write_cifar(data, per_batch=2, n_test=4)
    write_celeba(data, partitions=[0] * 6 + [1] * 4 + [2] * 2)
    sweep = tmp_path / "sweep"
    result = run_entry(
        "train.py", "-m", "experiment=mnist_paper", "data=mnist,cifar10,celeba", "debug=fast_dev_run",
        f"paths.data_dir={data}", "++data.verify_checksums=false", "model.net.ngf=8", "data.batch_size=4",
        "data.num_workers=0", "data.pin_memory=false", "logger=csv", "callbacks.progress_bar=null",
        f"hydra.sweep.dir={sweep}",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert len(jobs) == 3
    for job in jobs:
        assert not (job / "error.txt").exists(), (job / "error.txt").read_text()
        record = json.loads((job / "metrics.json").read_text())
        assert record["global_step"] == 1
        assert record["metrics"]["val/loss"] is not None and record["metrics"]["val/loss"] > 0


def test_verify_checksums_on_rejects_hand_made_cifar_files_with_one_line(tmp_path):
    write_cifar(tmp_path, per_batch=2, n_test=2)
    result = run_entry("train.py", "experiment=cifar10_paper", "debug=fast_dev_run", f"paths.data_dir={tmp_path}",
                       "logger=none", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error:") and "verify_checksums" in lines[-1]
    assert "Traceback" not in result.stderr


def test_short_run_writes_checkpoints_grid_wandb_image_config_and_metrics(trained_run):
    ckpt_dir = trained_run / "checkpoints"
    assert {"last.ckpt", "step_0000002.ckpt", "step_0000004.ckpt", "config.yaml", "run_info.json"} <= {
        p.name for p in ckpt_dir.iterdir()}
    grids = sorted((trained_run / "samples").glob("step_*.png"))
    assert grids and Image.open(grids[-1]).size[0] > 28
    wandb_images = list(trained_run.glob("wandb/offline-run-*/files/media/images/samples/*.png"))
    assert wandb_images, "the sample grid must be logged to W&B (offline) inside the run dir"
    record = json.loads((trained_run / "metrics.json").read_text())
    assert record["global_step"] == 4
    assert {k for k in record["metrics"] if k.startswith("val/loss_sigma")} == {  # the fixed σ bins of 1 -> 0.01
        f"val/loss_sigma_bin/{lo:08.3f}-{hi:08.3f}"
        for lo, hi in ((1, 2), (0.5, 1), (0.2, 0.5), (0.1, 0.2), (0.05, 0.1), (0.02, 0.05), (0.01, 0.02))}
    info = json.loads((ckpt_dir / "run_info.json").read_text())
    assert info["torch"] == torch.__version__ and info["ncsn"]
    ckpt = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4
    assert ckpt["ncsn_config"]["sigmas"]["num_scales"] == 10
    assert "current_model_state" in ckpt and "averaging_state" in ckpt  # EMA weights and raw weights
    torch.testing.assert_close(ckpt["state_dict"]["sigmas"], torch.logspace(0, -2, 10), rtol=1e-5, atol=0)


def test_resume_continues_at_the_saved_step_with_optimizer_and_ema_state(trained_run, tmp_path):
    last = trained_run / "checkpoints" / "last.ckpt"
    before = torch.load(last, map_location="cpu", weights_only=False)
    resumed = tmp_path / "resumed"
    result = run_entry("train.py", *TINY, EMA_ON, f"ckpt_path={last}", "trainer.max_steps=6", "logger=csv",
                       f"hydra.run.dir={resumed}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    after = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert after["global_step"] == 6
    adam_steps = {int(s["step"]) for s in after["optimizer_states"][0]["state"].values()}
    assert adam_steps == {6}, "Adam's moments must continue from the checkpoint (6 steps), not restart (2)"
    assert int(after["averaging_state"]["n_averaged"]) == int(before["averaging_state"]["n_averaged"]) + 2
    with open(resumed / "csv" / "metrics.csv") as f:
        steps = [int(row["step"]) for row in csv.DictReader(f) if row["step"]]
    assert min(steps) >= 4, "logging resumes at the saved step"


def test_ddp_sim_trains_with_two_processes_and_leaves_one_output_dir(tmp_path):
    runs = tmp_path / "runs"
    result = run_entry("train.py", *TINY, "trainer=ddp_sim", "data.batch_size=8", "logger=csv",
                       "callbacks.progress_bar=null", f"hydra.run.dir={runs / 'ddp'}", f"paths.log_dir={tmp_path}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [p.name for p in runs.iterdir()] == ["ddp"]
    record = json.loads((runs / "ddp" / "metrics.json").read_text())
    assert record["global_step"] == 4
    assert record["images_per_second"] > 0
    # global batch 8 over 2 processes: 4 per process, so the logged sample count is 2 x 4 x 4 steps
    ckpt = torch.load(runs / "ddp" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4


def test_global_batch_not_divisible_by_devices_is_one_line(tmp_path):
    result = run_entry("train.py", *TINY, "trainer=ddp_sim", "data.batch_size=7", "logger=none",
                       f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode != 0
    assert "not divisible by 2" in result.stderr + result.stdout


def test_the_last_lines_name_the_grid_and_checkpoint_and_a_sampling_command_that_runs(tmp_path):
    run = tmp_path / "run"
    result = run_entry("train.py", *TINY, "logger=none", f"hydra.run.dir={run}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-4:]
    ckpt = run.resolve() / "checkpoints" / "last.ckpt"
    assert last[0] == f"samples grid:   {run.resolve() / 'samples' / 'step_0000004.png'}", result.stdout[-2000:]
    assert re.fullmatch(r"sample quality: quality/kid -?[\d.e+-]+ \(final samples; lower is better\)", last[1]), last
    assert last[2] == f"checkpoint:     {ckpt}" and ckpt.is_file()
    prefix, _, command = last[3].partition(": ")
    assert prefix == "sample from it" and command.endswith(f"sample.py ckpt_path={ckpt} num_samples=256"), last
    argv = shlex.split(command)
    assert argv[0] in ("python", ".venv/bin/python", sys.executable), argv  # runnable from the repository root
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    sampled = subprocess.run([*argv, "num_samples=2", "sampler.n_steps_each=1", "progress=false",
                              f"hydra.run.dir={tmp_path / 'sampled'}"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=600, check=False)
    assert sampled.returncode == 0, sampled.stdout[-3000:] + sampled.stderr[-3000:]
    assert (tmp_path / "sampled" / "samples.png").is_file()
    console = result.stdout + result.stderr
    for noise in ("INFO: ", "💡 Tip", "LeafSpec", "does not have many workers"):
        assert noise not in console, noise
    assert console.count("`Trainer.fit` stopped: `max_steps=4` reached.") == 1  # printed once (not Lightning's copy)
    assert "`Trainer.fit` stopped: `max_steps=4` reached." in (run / "train.log").read_text()  # and in the file log


def test_the_wandb_logger_does_not_pass_the_anonymous_setting_wandb_warns_about(tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["logger=wandb", f"paths.output_dir={tmp_path}"])
    logger = instantiate(cfg.logger.wandb)
    assert isinstance(logger, WandbLogger) and logger._wandb_init["project"] == "ncsn"
    assert "anonymous" not in logger._wandb_init  # Lightning passes anonymous=None; wandb warns for any value
