"""Reliability: the misuse matrix (README troubleshooting table, row for row), crash-and-resume, non-finite
losses, reproducibility."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, run_entry

# (id, command a user types (after `python`), fragment of the one line they get, exit code)
# {ckpt}: a real checkpoint; {run}: an earlier run dir; {tmp}: an empty dir; {file}: a text file.
MISUSE = [
    ("unknown-data", "train.py data=imagenet", "unknown data 'imagenet'; choose one of: celeba, cifar10", 2),
    ("unknown-model", "train.py model=unet", "unknown model 'unet'; choose one of: mlp, ncsn, ncsnv2", 2),
    ("unknown-experiment", "train.py experiment=cifar100", "unknown experiment 'cifar100'; choose one of:", 2),
    ("mnist-missing", "train.py data=mnist paths.data_dir={tmp}", "data.download=true", 2),
    ("cifar10-missing", "train.py data=cifar10 paths.data_dir={tmp}", "cifar-10-batches-py", 2),
    ("celeba-missing", "train.py data=celeba paths.data_dir={tmp}", "list_eval_partition.txt", 2),
    ("lsun-missing", "train.py data=lsun paths.data_dir={tmp}", "church_outdoor_train_lmdb", 2),
    ("image-folder-without-path", "train.py data=image_folder", "data=image_folder needs data.path=", 2),
    ("sigmas-increasing", "train.py sigmas.sigma_max=0.001", "must be larger than sigmas.sigma_min", 2),
    ("sigma-not-positive", "train.py sigmas.sigma_min=0", "sigmas.sigma_min must be > 0", 2),
    ("one-level", "train.py sigmas.num_scales=1", "sigmas.num_scales must be an integer >= 2", 2),
    ("step-lr-not-positive", "train.py sampler.step_lr=0", "sampler.step_lr must be > 0", 2),
    ("no-langevin-steps", "train.py sampler.n_steps_each=0", "sampler.n_steps_each must be an integer >= 1", 2),
    ("snr-not-positive", "train.py sampler=pc sampler.snr=0", "sampler.snr must be > 0", 2),
    ("batch-not-divisible", "train.py trainer=ddp_sim data.batch_size=127", "not divisible by 2 devices", 2),
    ("gpu-without-gpu", "train.py trainer=gpu", "trainer=gpu needs a CUDA GPU", 2),
    ("ckpt-missing", "train.py ckpt_path={tmp}/last.ckpt", "does not exist", 2),
    ("ckpt-is-directory", "train.py ckpt_path={tmp}", "is a directory", 2),
    ("ckpt-not-a-checkpoint", "train.py ckpt_path={file}", "is not a readable checkpoint", 2),
    ("ckpt-truncated", "sample.py ckpt_path={truncated}", "is not a readable checkpoint", 2),
    ("ckpt-other-model", "train.py experiment=mnist_paper model.net.ngf=16 ckpt_path={ckpt}",
     "was trained with a different model config", 2),
    ("no-samples", "sample.py ckpt_path={ckpt} num_samples=0", "num_samples must be > 0", 2),
    ("output-dir-exists", "train.py hydra.run.dir={run}", "already holds a run and is never overwritten", 2),
    ("output-dir-unwritable", "train.py hydra.run.dir={file}/run", "cannot be created", 2),
]


def fill(command: str, ctx: dict) -> list[str]:
    return command.format(**ctx).split()


@pytest.fixture(scope="module")
def ctx(trained_run, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("empty")
    text = tmp_path_factory.mktemp("files") / "notes.txt"
    text.write_text("not a checkpoint\n")
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    truncated = tmp_path_factory.mktemp("cut") / "last.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[:4096])
    return {"tmp": tmp, "file": text, "ckpt": ckpt, "run": trained_run, "truncated": truncated}


@pytest.mark.slow
@pytest.mark.parametrize("case, command, fragment, code", MISUSE, ids=[m[0] for m in MISUSE])
def test_misuse_gives_one_clear_line_and_nonzero_exit(case, command, fragment, code, ctx, tmp_path):
    script, *args = fill(command, ctx)
    if not any(a.startswith("hydra.run.dir=") for a in args):
        args.append(f"hydra.run.dir={tmp_path / 'out'}")
    before = sorted(p.name for p in ctx["run"].rglob("*"))
    result = run_entry(script, *args, "logger=none" if script == "train.py" else "progress=false", timeout=300)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == code, result.stdout[-2000:] + result.stderr[-2000:]
    assert lines and lines[-1].startswith("error: ") and fragment in lines[-1], lines[-3:]
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in ctx["run"].rglob("*")) == before, "an earlier run must never be touched"
    assert not list((tmp_path / "out").glob("**/*.ckpt")) and not list((tmp_path / "out").glob("**/*.png"))


def test_readme_troubleshooting_table_matches_the_misuse_tests_row_for_row():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    rows = [r for r in section.splitlines() if r.startswith("| `")]
    assert len(rows) == len(MISUSE)
    for row, (case, command, fragment, code) in zip(rows, MISUSE):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == f"`python {command}`", (case, cells[0])
        assert fragment in cells[1], (case, cells[1])
        assert cells[2] == str(code), case


def test_wandb_online_without_an_api_key_falls_back_to_offline(tmp_path):
    env = {"WANDB_MODE": "", "WANDB_API_KEY": "", "HOME": str(tmp_path), "NETRC": str(tmp_path / "none")}
    result = run_entry("train.py", *TINY, "debug=fast_dev_run", "logger.wandb.offline=false",
                       f"hydra.run.dir={tmp_path / 'run'}", env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no API key is set" in result.stdout + result.stderr
    assert list((tmp_path / "run").glob("wandb/offline-run-*"))


def test_non_finite_loss_stops_naming_step_and_level_and_keeps_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    result = run_entry("train.py", "experiment=toy_gmm", "logger=none", "callbacks.sample_grid=null",
                       "model.optimizer.lr=1e12", "trainer.max_steps=200", "callbacks.model_checkpoint.every_n_train_steps=1",
                       f"hydra.run.dir={run}")
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 2, result.stderr[-2000:]
    assert re.search(r"non-finite training loss .* at global step \d+, level \d+ \(sigma=", lines[-1]), lines[-1]
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    assert not list((run / "checkpoints").glob("*.part"))


# ---------------------------------------------------------------------------------------------- crash & resume
RESUMABLE = ["experiment=toy_gmm", "logger=none", "callbacks.progress_bar=null", "callbacks.sample_grid=null",
             "data.n_train=1024", "data.n_val=256", "callbacks.model_checkpoint.every_n_train_steps=8",
             "trainer.max_steps=24"]


def kill_when(run: Path, marker: str | None, delay: float = 0.0) -> int:
    """Start train.py into ``run`` (auto-resuming), SIGKILL it once ``marker`` exists (+delay); return step."""
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *RESUMABLE, f"hydra.run.dir={run}",
                             "auto_resume=true"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while marker and not (run / marker).exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    last = run / "checkpoints" / "last.ckpt"
    return torch.load(last, map_location="cpu", weights_only=False)["global_step"] if last.exists() else 0


@pytest.mark.slow
def test_killed_three_times_resumes_and_ends_bit_identical_to_an_uninterrupted_run(tmp_path):
    full = run_entry("train.py", *RESUMABLE, f"hydra.run.dir={tmp_path / 'full'}", env={"OMP_NUM_THREADS": "1"})
    assert full.returncode == 0, full.stderr[-2000:]
    run = tmp_path / "killed"
    steps = [kill_when(run, None, delay=3.0),                              # while starting up
             kill_when(run, "checkpoints/step_0000008.ckpt", delay=0.2),   # just after a checkpoint
             kill_when(run, "checkpoints/step_0000016.ckpt", delay=0.0)]   # while writing the next one
    assert steps[0] in (0, 8, 16) and steps[1] >= 8 and steps[2] >= 16
    for ckpt in (run / "checkpoints").glob("*.ckpt"):  # only complete checkpoints, whenever the kill came
        torch.load(ckpt, map_location="cpu", weights_only=False)
    done = run_entry("train.py", *RESUMABLE, f"hydra.run.dir={run}", "auto_resume=true", env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert a["global_step"] == b["global_step"] == 24
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])


# ---------------------------------------------------------------------------------------------- reproducibility
def test_same_seed_same_first_training_losses(tmp_path):
    losses = []
    for name in ("a", "b"):
        run = tmp_path / name
        result = run_entry("train.py", "experiment=toy_gmm", "logger=csv", "callbacks.sample_grid=null",
                           "trainer.max_steps=50", "trainer.log_every_n_steps=1", f"hydra.run.dir={run}")
        assert result.returncode == 0, result.stderr[-2000:]
        rows = (run / "csv" / "metrics.csv").read_text().splitlines()
        header = rows[0].split(",")
        col = header.index("train/loss")
        losses.append([r.split(",")[col] for r in rows[1:] if r.split(",")[col]])
    assert len(losses[0]) == 50 and losses[0] == losses[1]


def test_run_dir_records_versions_and_commit(trained_run):
    info = json.loads((trained_run / "checkpoints" / "run_info.json").read_text())
    import lightning

    import ncsn

    assert info["torch"] == torch.__version__ and info["lightning"] == lightning.__version__
    assert info["ncsn"] == ncsn.__version__
    assert "git_commit" in info
