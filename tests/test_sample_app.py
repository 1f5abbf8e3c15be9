"""sample.py on a checkpoint from a real (tiny) training run: every mode, overrides, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, run_entry
from hydra import compose, initialize_config_dir
from PIL import Image

from ncsn.app import user_errors_exit
from ncsn.sampling_app import make_mask, sample

FAST = ["sampler.n_steps_each=2", "progress=false", "num_samples=6", "batch_size=4"]


def run_sample(out: Path, ckpt: Path, *overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("sample", overrides=[f"ckpt_path={ckpt}", f"paths.output_dir={out}", *FAST, *overrides])
    return sample(cfg)


@pytest.fixture(scope="module")
def ckpt(trained_run) -> Path:
    return trained_run / "checkpoints" / "last.ckpt"


def test_generate_writes_grid_and_uint8_nhwc_array(ckpt, tmp_path):
    files = run_sample(tmp_path, ckpt, "save_individual=true")
    arr = np.load(files["array"])["samples"]
    assert arr.dtype == np.uint8 and arr.shape == (6, 28, 28, 1)
    assert 0 <= arr.min() and arr.max() <= 255 and arr.std() > 0
    grid = Image.open(files["grid"])
    assert grid.size[0] >= 2 * 28
    assert len(list((tmp_path / "images").glob("*.png"))) == 6


def test_same_seed_same_samples_and_sampler_overrides_change_them(ckpt, tmp_path):
    a = np.load(run_sample(tmp_path / "a", ckpt)["array"])["samples"]
    b = np.load(run_sample(tmp_path / "b", ckpt)["array"])["samples"]
    c = np.load(run_sample(tmp_path / "c", ckpt, "sampler.step_lr=1e-4")["array"])["samples"]
    d = np.load(run_sample(tmp_path / "d", ckpt, "seed=1")["array"])["samples"]
    e = np.load(run_sample(tmp_path / "e", ckpt, "sampler.denoise=true")["array"])["samples"]
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, d) and not np.array_equal(a, e)


def test_trajectory_strips_and_gif(ckpt, tmp_path):
    files = run_sample(tmp_path, ckpt, "mode=trajectory", "trajectory.num=3", "trajectory.every=1",
                       "trajectory.gif=true")
    strips = sorted(tmp_path.glob("trajectory_*.png"))
    gifs = sorted(tmp_path.glob("trajectory_*.gif"))
    assert len(strips) == 3 and len(gifs) == 3
    # L = 10 levels x T = 2 steps recorded every step, plus the initial and the final frame
    frames = Image.open(gifs[0]).n_frames
    assert frames == 1 + 10 * 2  # the initial frame, then L = 10 levels x T = 2 steps
    assert Image.open(strips[0]).size[0] > frames * 28
    assert files


def test_inpaint_keeps_the_known_half(ckpt, tmp_path):
    files = run_sample(tmp_path, ckpt, "mode=inpaint", "inpaint.num=2", "inpaint.num_completions=3")
    arrays = np.load(files["array"])
    completions, originals = arrays["completions"], arrays["originals"]
    assert completions.shape == (6, 28, 28, 1) and originals.shape == (2, 28, 28, 1)
    left = completions.reshape(2, 3, 28, 28, 1)[:, :, :, :14]
    assert np.abs(left.astype(int) - originals[:, None, :, :14].astype(int)).max() <= 1
    assert Image.open(files["grid"]).size[0] > 5 * 28  # occluded | 3 completions | original


def test_masks():
    assert make_mask("right_half", (1, 1, 4, 4))[..., 2:].sum() == 0
    centre = make_mask("centre_square", (1, 1, 8, 8), square=4)
    assert centre.sum() == 64 - 16 and centre[..., 2:6, 2:6].sum() == 0
    rnd = make_mask("random", (3, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    assert rnd.shape == (3, 1, 8, 8) and 0 < rnd.mean() < 1


def test_nearest_neighbours(ckpt, tmp_path):
    run_sample(tmp_path, ckpt, "mode=nn", "nn.num=2", "nn.k=3")
    distances = json.loads((tmp_path / "nearest_neighbours.json").read_text())["l2_distances"]
    assert len(distances) == 2 and all(len(d) == 3 and d == sorted(d) for d in distances)
    assert (tmp_path / "nearest_neighbours.png").exists()


def test_fid_with_a_custom_feature_network(ckpt, tmp_path):
    run_sample(tmp_path, ckpt, "mode=fid", "num_samples=16", "fid.num_real=16", "fid.inception_score=false",
               "+fid.feature={_target_:ncsn.metrics.SmallFeatureNet,in_channels:1}")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert np.isfinite(metrics["fid"]) and metrics["fid"] > 0
    assert metrics["settings"]["num_samples"] == 16 and metrics["num_fake"] == 16


@pytest.mark.parametrize("case", ["missing", "directory", "truncated", "not_a_checkpoint", "num_samples"])
def test_bad_input_is_one_line_and_exit_2(case, ckpt, tmp_path, capsys):
    overrides = []
    if case == "missing":
        path = tmp_path / "nope.ckpt"
    elif case == "directory":
        path = ckpt.parent
    elif case == "truncated":
        path = tmp_path / "cut.ckpt"
        path.write_bytes(ckpt.read_bytes()[:5000])
    elif case == "not_a_checkpoint":
        path = tmp_path / "model.ckpt"
        torch.save({"weights": torch.zeros(2)}, path)
    else:
        path, overrides = ckpt, ["num_samples=0"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("sample", overrides=[f"ckpt_path={path}", f"paths.output_dir={tmp_path / 'out'}", *overrides])
    with pytest.raises(SystemExit) as exit_info:
        user_errors_exit(sample)(cfg)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert not list((tmp_path / "out").glob("*.png")) if (tmp_path / "out").exists() else True


def test_sample_py_entry_point_errors_without_traceback(tmp_path):
    result = run_entry("sample.py", f"ckpt_path={tmp_path / 'missing.ckpt'}", f"hydra.run.dir={tmp_path / 'o'}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: checkpoint")
    assert "Traceback" not in result.stderr
