"""``python -m ncsn.metrics score FILE.npz [data=NAME]`` through the CLI, as a user runs it: real digits score best,
blurred digits (a stand-in for an imperfect sampler's) in between, noise worst; the last line is one JSON object;
and on the same samples it gives the values the training pass gives, for every shipped dataset (tiny files in each
dataset's real format, tests/fakes.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import ROOT
from fakes import write_celeba, write_cifar, write_mnist
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from ncsn.app.common import instantiate
from ncsn.metrics import digits
from ncsn.tools.score import main


def score(path, *args):
    env = {"OMP_NUM_THREADS": "1", "PATH": ""}
    if os.environ.get("PYTHONPATH"):  # the tree under test
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    proc = subprocess.run([sys.executable, "-m", "ncsn.metrics", "score", str(path), *args], capture_output=True,
                          text=True, timeout=300, check=False, env=env)
    return proc


def test_real_digits_score_best_blurred_in_between_noise_worst(tmp_path):
    train = digits.bundled_split()["train_images"][:128]  # real digits, none of them in the reference
    blurred = torch.nn.functional.avg_pool2d(train.float()[:, None], 3, 1, 1).round().to(torch.uint8)
    files = {"real": train.numpy()[..., None],  # uint8 [N, 28, 28, 1], the layout sample.py writes
             "blurred": blurred.numpy().transpose(0, 2, 3, 1),
             "noise": np.random.default_rng(0).integers(0, 256, (128, 28, 28, 1), dtype=np.uint8)}
    kid = {}
    for name, array in files.items():
        np.savez(tmp_path / f"{name}.npz", samples=array)
        proc = score(tmp_path / f"{name}.npz", "data=mnist_bundled")
        assert proc.returncode == 0, proc.stderr[-2000:]
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert next(iter(result)) == "quality/kid" and result["num_samples"] == 128
        assert {"quality/kid_std", "quality/fd", "quality/fd_ratio", "quality/degenerate"} <= set(result)
        kid[name] = result["quality/kid"]
    assert kid["real"] < kid["blurred"] < kid["noise"], kid


def test_help_prints_the_usage_and_scores_nothing(capsys):
    # `--help` was taken for a file name ("samples file --help does not exist", exit 2)
    for args in (["score", "--help"], ["--help"], ["score", "-h"]):
        assert main(args) == 0
        out = capsys.readouterr()
        assert out.out.startswith("usage: python -m ncsn.metrics score FILE.npz") and "data=NAME" in out.out
        assert out.err == ""


def test_user_errors_are_one_line(tmp_path, capsys):
    assert main(["score", str(tmp_path / "missing.npz")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    np.savez(tmp_path / "two.npz", a=np.zeros((4, 2)), b=np.zeros((4, 2)))
    assert main(["score", str(tmp_path / "two.npz")]) == 2
    np.save(tmp_path / "rgb.npy", np.zeros((4, 32, 32, 3), dtype=np.uint8))
    assert main(["score", str(tmp_path / "rgb.npy")]) == 2
    assert "data=NAME" in capsys.readouterr().err
    assert main(["score", str(tmp_path / "rgb.npy"), "colour=red"]) == 2
    points = tmp_path / "points.npz"
    np.savez(points, samples=np.random.default_rng(0).normal(size=(64, 2)).astype(np.float32))
    assert main(["score", str(points)]) == 0  # 2-D points: the toy mixture's metric
    assert "quality/energy_distance" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])


# ---- the CLI and the training pass agree -------------------------------------------------------------------

N = 6  # samples, and the sample grid's num_samples
# every shipped dataset (conf/data/), with the overrides a run would use; the files are written by `write`
DATASETS = {
    "mnist_bundled": [],
    "mnist": [],
    "cifar10": ["data.verify_checksums=false"],
    "celeba": [],  # the group's center_crop 140, then 32 px
    "celeba-64": ["data.image_size=64"],
    "toy_gmm": [],
}


def write(name: str, root) -> None:
    if name == "mnist":
        write_mnist(root, n_train=8, n_test=5)
    elif name == "cifar10":
        write_cifar(root, per_batch=4, n_test=6)
    elif name == "celeba":
        write_celeba(root, [0] * 8 + [1] * 5 + [2] * 2)


def training_pass_values(overrides: list[str], samples: torch.Tensor) -> dict:
    """What the training run's sample-grid pass logs for these samples: its datamodule and callback built from the
    composed train config (as ncsn.app.train.build builds them), scored by the callback's own code."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, "~experiment", f"callbacks.sample_grid.num_samples={N}"])
    GlobalHydra.instance().clear()
    callback = instantiate(cfg.callbacks.sample_grid)
    trainer = SimpleNamespace(datamodule=instantiate(cfg.data), loggers=[])
    return callback._score(trainer, SimpleNamespace(device=torch.device("cpu")), samples, step=1)


@pytest.mark.parametrize("case", list(DATASETS))
def test_the_cli_gives_the_training_pass_values_on_the_same_samples(case, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # no cached Inception weights
    name = case.split("-")[0]
    write(name, tmp_path)
    overrides = [f"data={name}", f"paths.data_dir={tmp_path}", *DATASETS[case]]
    rng = np.random.default_rng(0)
    if name == "toy_gmm":
        points = rng.normal(size=(N, 2)).astype(np.float32) * 3 + 4
        array, model_range = points, torch.from_numpy(points)
    else:
        size, channels = (28, 1) if name.startswith("mnist") else (64 if "64" in case else 32, 3)
        array = rng.integers(0, 256, (N, size, size, channels), dtype=np.uint8)  # as sample.py writes them
        model_range = torch.from_numpy(array).permute(0, 3, 1, 2).float() / 255.0
    np.savez(tmp_path / "samples.npz", samples=array)

    expected = training_pass_values(overrides, model_range)
    assert main(["score", str(tmp_path / "samples.npz"), *overrides]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["num_samples"] == N and result["data"] == name
    assert next(iter(result)) in expected
    assert {k: result[k] for k in expected} == pytest.approx(expected, rel=1e-6, abs=1e-9)
