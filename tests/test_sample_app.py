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

from ncsn.app.common import user_errors_exit
from ncsn.app.sample import make_mask, sample

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


# ---- samplers: one word switches it on any checkpoint ------------------------------------------------------

def test_sampler_group_replaces_the_checkpoints_settings_and_field_overrides_apply_after(ckpt, tmp_path):
    # the tiny run: mnist_paper, L = 10, ald with denoise off
    run_sample(tmp_path / "pc", ckpt, "sampler=pc")
    used = json.loads((tmp_path / "pc" / "sampler.json").read_text())
    assert used["sampler"]["name"] == "pc" and used["sampler"]["denoise"] is True  # the group's default
    assert (used["sampler"]["n_corrector"], used["sampler"]["snr"], used["nfe"]) == (1, 0.16, 10 * 2)
    run_sample(tmp_path / "pc2", ckpt, "sampler=pc", "sampler.n_corrector=2", "sampler.snr=0.3")
    used = json.loads((tmp_path / "pc2" / "sampler.json").read_text())
    assert (used["sampler"]["n_corrector"], used["sampler"]["snr"], used["nfe"]) == (2, 0.3, 10 * 3)
    a = np.load(tmp_path / "pc" / "samples.npz")["samples"]
    b = np.load(run_sample(tmp_path / "ald", ckpt)["array"])["samples"]
    assert a.shape == b.shape and not np.array_equal(a, b)
    used = json.loads((tmp_path / "ald" / "sampler.json").read_text())
    assert used["sampler"]["name"] == "ald" and used["nfe"] == 10 * 2  # the checkpoint's ald, T from FAST


@pytest.mark.parametrize("name, steps, nfe", [("euler", 6, 6), ("heun", 5, 9), ("dpmpp_2m", 6, 6),
                                              ("euler_ancestral", 6, 6), ("edm", 5, 9)])
def test_one_word_switches_to_a_few_step_sampler_on_a_level_indexed_checkpoint(ckpt, tmp_path, name, steps, nfe):
    # the tiny run's network is the paper's NCSN (level-indexed, L = 10): the grid snaps to its levels
    files = run_sample(tmp_path, ckpt, f"sampler={name}", f"sampler.num_steps={steps}")
    used = json.loads((tmp_path / "sampler.json").read_text())
    assert used["sampler"]["name"] == name and used["sampler"]["num_steps"] == steps and used["nfe"] == nfe
    assert "n_steps_each" not in used["sampler"] and "denoise" not in used["sampler"]
    arr = np.load(files["array"])["samples"]
    assert arr.shape == (6, 28, 28, 1) and arr.std() > 0


def test_cas_on_a_schedule_too_coarse_for_its_step_is_one_line_and_writes_nothing(ckpt, tmp_path, capsys):
    # sigma 1 -> 0.01 over 10 levels drops 40 % of the noise per level: cas needs step_lr >= 4e-5
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("sample", overrides=[f"ckpt_path={ckpt}", f"paths.output_dir={tmp_path / 'out'}", *FAST,
                                           "sampler=cas"])
    with pytest.raises(SystemExit) as exit_info:
        user_errors_exit(sample)(cfg)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "step_lr >= 4" in err[0]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["error.txt"]  # the one line, nothing else
    run_sample(tmp_path / "ok", ckpt, "sampler=cas", "sampler.step_lr=6e-5")
    used = json.loads((tmp_path / "ok" / "sampler.json").read_text())
    assert used["nfe"] == 9 * 2 + 1  # (L - 1) levels x T = 2 (FAST) + the denoising step


def test_a_checkpoint_written_before_samplers_had_names_samples_with_ald_and_switches(ckpt, tmp_path):
    old = torch.load(ckpt, map_location="cpu", weights_only=False)
    old["ncsn_config"]["model"]["sampler"].pop("name", None)
    old["ncsn_config"]["sampler"].pop("name", None)
    path = tmp_path / "old.ckpt"
    torch.save(old, path)
    run_sample(tmp_path / "a", path)
    assert json.loads((tmp_path / "a" / "sampler.json").read_text())["sampler"]["name"] == "ald"
    run_sample(tmp_path / "b", path, "sampler=pc", "sampler.n_corrector=0")
    assert json.loads((tmp_path / "b" / "sampler.json").read_text())["nfe"] == 10


@pytest.mark.parametrize("sampler, frames", [("pc", 1 + 10 * 2), ("cas", 1 + 9 * 2 + 1), ("heun", 1 + 4),
                                             ("edm", 1 + 4)])
def test_trajectory_and_inpainting_work_with_every_sampler(ckpt, tmp_path, sampler, frames):
    extra = {"cas": ["sampler.step_lr=6e-5"], "heun": ["sampler.num_steps=4"],
             "edm": ["sampler.num_steps=4"]}.get(sampler, [])
    run_sample(tmp_path / "t", ckpt, f"sampler={sampler}", *extra, "mode=trajectory", "trajectory.num=2",
               "trajectory.every=1", "trajectory.gif=true")
    # one frame per step (+ the start, + the denoised one): the strip is frames x (28 + 2 padding) + 2 wide
    assert Image.open(tmp_path / "t" / "trajectory_00.png").size[0] == frames * 30 + 2
    assert (tmp_path / "t" / "trajectory_01.gif").is_file()
    files = run_sample(tmp_path / "i", ckpt, f"sampler={sampler}", *extra, "mode=inpaint", "inpaint.num=2",
                       "inpaint.num_completions=2")
    arrays = np.load(files["array"])
    left = arrays["completions"].reshape(2, 2, 28, 28, 1)[:, :, :, :14]
    assert np.abs(left.astype(int) - arrays["originals"][:, None, :, :14].astype(int)).max() <= 1


def test_bench_samplers_tables_nfe_quality_and_a_plot_for_each_setting(ckpt, tmp_path):
    # bench/samplers.py on a real checkpoint: one row per setting with its exact NFE and the dataset's metric
    import csv
    import subprocess
    import sys

    levels = torch.load(ckpt, map_location="cpu", weights_only=False)["ncsn_config"]["sigmas"]["num_scales"]
    out = tmp_path / "bench"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "samplers.py"), str(ckpt), "--num-samples", "8",
                             "--batch-size", "4", "--threads", "1", "--out", str(out),
                             "--grid", "pc:n_corrector=0,denoise=true;pc:n_corrector=1,snr=0.16,denoise=true"],
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    with open(out / "samplers.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["sampler"], int(r["nfe"])) for r in rows] == [("pc", levels), ("pc", 2 * levels)]
    assert all(r["primary_key"] == "quality/kid" and np.isfinite(float(r["primary"])) for r in rows), rows
    assert all(float(r["seconds"]) > 0 for r in rows)
    assert Image.open(out / "samplers.png").size[0] > 300
    assert "| pc | pc (n_corrector=1" in (out / "samplers.md").read_text()
    assert [p.name for p in sorted(out.glob("grid_*.png"))] == ["grid_01_pc.png", "grid_02_pc.png"]  # to look at
    assert "kernels" in (out / "samplers.md").read_text().splitlines()[0]  # which CPU kernel set ran (issue 37)


def test_bench_ode_diagnosis_compares_the_noise_seen_on_each_path_with_noised_real_data(ckpt, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("ode_diagnosis", ROOT / "bench" / "ode_diagnosis.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "diag"
    assert bench.main([str(ckpt), "--samplers", "heun,edm", "--steps", "4", "--num", "4", "--out", str(out)]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "σ" not in line]
    # one row per positive σ the paths pass through (the 10-level NCSN snaps 4 steps to 4 trained levels, minus σ 0)
    assert len(table) == 3
    for line in table:
        cells = [float(c) for c in line.strip("| ").split(" | ")]
        assert all(np.isfinite(cells)) and cells[0] > 0 and cells[1] >= 0
    assert (out / "diagnosis.md").is_file() and (out / "final_heun.png").is_file() and (out / "final_edm.png").is_file()
