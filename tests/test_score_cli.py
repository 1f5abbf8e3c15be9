"""``python -m ncsn.metrics score FILE.npz [data=NAME]`` through the CLI, as a user runs it: real digits score best,
blurred digits (a stand-in for an imperfect sampler's) in between, noise worst; the last line is one JSON object."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import torch

from ncsn.metrics import digits
from ncsn.metrics.score import main


def score(path, *args):
    proc = subprocess.run([sys.executable, "-m", "ncsn.metrics", "score", str(path), *args], capture_output=True,
                          text=True, timeout=300, check=False, env={"OMP_NUM_THREADS": "1", "PATH": ""})
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
