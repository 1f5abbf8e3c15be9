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

import numpy as np
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
    ("step-lr-not-positive", "train.py sampler=ald sampler.step_lr=0", "sampler.step_lr must be > 0", 2),
    ("no-langevin-steps", "train.py sampler=ald sampler.n_steps_each=0", "sampler.n_steps_each must be an integer >= 1",
     2),
    ("no-grid-steps", "train.py sampler=edm sampler.num_steps=0", "sampler.num_steps must be an integer >= 1", 2),
    ("snr-not-positive", "train.py sampler=pc sampler.snr=0", "sampler.snr must be > 0", 2),
    ("batch-not-divisible", "train.py trainer=ddp_sim data.batch_size=127", "not divisible by 2 devices", 2),
    ("gpu-without-gpu", "train.py trainer=gpu", "trainer=gpu needs a CUDA GPU", 2),
    ("ckpt-missing", "train.py ckpt_path={tmp}/last.ckpt", "does not exist", 2),
    ("ckpt-is-directory", "train.py ckpt_path={tmp}", "is a directory", 2),
    ("ckpt-not-a-checkpoint", "train.py ckpt_path={file}", "is not a readable checkpoint", 2),
    ("ckpt-truncated", "sample.py ckpt_path={truncated}", "is not a readable checkpoint", 2),
    ("ckpt-other-model", "train.py experiment=mnist_paper model.net.ngf=16 ckpt_path={ckpt}",
     "was trained with a different model config", 2),
    ("no-samples", "sample.py ckpt_path={ckpt} num_samples=0", "num_samples must be a whole number >= 1", 2),
    ("output-dir-exists", "train.py hydra.run.dir={run}", "already holds a run and is never overwritten", 2),
    ("output-dir-unwritable", "train.py hydra.run.dir={file}/run", "cannot be created", 2),
    ("misspelt-setting", "train.py trainer.max_stepz=3", "'trainer.max_stepz' is not a setting", 2),
    ("samples-into-a-run", "sample.py ckpt_path={ckpt} hydra.run.dir={run}", "already holds a run", 2),
    ("score-float-range", "-m ncsn.metrics score {floats}", "float images must lie in [0, 1]", 2),
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
    floats = tmp_path_factory.mktemp("arrays") / "samples.npy"
    np.save(floats, np.linspace(0, 255, 16 * 28 * 28, dtype=np.float32).reshape(16, 28, 28))  # not / 255
    return {"tmp": tmp, "file": text, "ckpt": ckpt, "run": trained_run, "truncated": truncated, "floats": floats}


@pytest.mark.slow
@pytest.mark.parametrize("case, command, fragment, code", MISUSE, ids=[m[0] for m in MISUSE])
def test_misuse_gives_one_clear_line_and_nonzero_exit(case, command, fragment, code, ctx, tmp_path):
    script, *args = fill(command, ctx)
    before = sorted(p.name for p in ctx["run"].rglob("*"))
    if script == "-m":  # a tool: python -m ncsn.<tool> ...
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("HYDRA_FULL_ERROR", None)
        result = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=300,
                                env=env, cwd=tmp_path, check=False)
    else:
        if not any(a.startswith("hydra.run.dir=") for a in args):
            args.append(f"hydra.run.dir={tmp_path / 'out'}")
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


# ---------------------------------------------------------------------------------------------- every CLI argument
# Every argument of every CLI as a new user mistypes it: (id, command after `python`, fragment of the one line).
# {ckpt}: a real checkpoint; {run}: an earlier run dir; {files}: a dir of prepared files; {tmp}: an empty dir;
# {out}: this case's own output dir (train.py / sample.py get hydra.run.dir={out} unless the case sets one).
# All of them run in one process (tests/cli_matrix.py: each through runpy, as `python` runs it).
TRAIN = "train.py experiment=cpu logger=none"
SAMPLE = "sample.py ckpt_path={ckpt} progress=false num_samples=4"
SCORE = "-m ncsn.metrics score"
CONVERT = "-m ncsn.tools.convert {files}/official.pth experiment=mnist_paper model.net.ngf=8 out={out}/converted.ckpt"
SIGMAS = "-m ncsn.sigmas suggest"
CLI_CASES = [
    # train.py: the trainer
    ("train-cuda-missing", f"{TRAIN} trainer.accelerator=cuda", "trainer.accelerator=cuda needs a CUDA GPU"),
    ("train-accelerator-unknown", f"{TRAIN} trainer.accelerator=banana", "invalid accelerator name"),
    ("train-devices-zero", f"{TRAIN} trainer.devices=0", "devices=0"),
    ("train-max-steps-zero", f"{TRAIN} trainer.max_steps=0", "trainer.max_steps=0 trains nothing"),
    ("train-max-steps-negative", f"{TRAIN} trainer.max_steps=-5", "`max_steps` must be a non-negative integer"),
    ("train-max-time-garbage", f"{TRAIN} trainer.max_time=banana", "is not a valid duration"),
    ("train-val-interval-zero", f"{TRAIN} trainer.val_check_interval=0", "trainer.val_check_interval must be > 0"),
    ("train-precision-unknown", f"{TRAIN} trainer.precision=banana", "Precision 'banana' is invalid"),
    ("train-val-batches-negative", f"{TRAIN} trainer.limit_val_batches=-1",
     "invalid value -1 for limit_val_batches"),
    # the data, the model, the σ list, the sampler
    ("train-batch-negative", f"{TRAIN} data.batch_size=-4", "data.batch_size must be a positive integer"),
    ("train-workers-negative", f"{TRAIN} data.num_workers=-1", "data.num_workers must be a whole number >= 0"),
    ("train-image-size-zero", f"{TRAIN} data.image_size=0", "data.image_size must be a positive integer"),
    ("train-val-size-zero", f"{TRAIN} data.val_size=0", "data.val_size=0 must be between 1 and"),
    ("train-data-missing", f"{TRAIN} data=mnist paths.data_dir={{tmp}}", "data.download=true"),
    ("train-ngf-zero", f"{TRAIN} model.net.ngf=0", "model.net.ngf must be a whole number >= 1"),
    ("train-lr-negative", f"{TRAIN} model.optimizer.lr=-1", "model.optimizer: Invalid learning rate"),
    ("train-loss-unknown", f"{TRAIN} model.loss=banana", "unknown loss 'banana'"),
    ("train-weight-power-nan", f"{TRAIN} model.weight_power=nan", "model.weight_power must be a finite number"),
    ("train-scales-zero", f"{TRAIN} sigmas.num_scales=0", "sigmas.num_scales must be an integer >= 2"),
    ("train-sigma-max-inf", f"{TRAIN} sigmas.sigma_max=inf", "sigmas.sigma_max must be a finite number"),
    ("train-sampler-unknown", f"{TRAIN} sampler=banana", "unknown sampler 'banana'"),
    ("train-sampler-name-unknown", f"{TRAIN} sampler.name=banana", "unknown sampler 'banana'"),
    ("train-step-lr-negative", f"{TRAIN} sampler=cas sampler.step_lr=-1", "sampler.step_lr must be > 0"),
    # the callbacks, the seed, the command line itself
    ("train-grid-samples-one", f"{TRAIN} callbacks.sample_grid.num_samples=1",
     "callbacks.sample_grid.num_samples must be a whole number >= 2"),
    ("train-grid-every-negative", f"{TRAIN} callbacks.sample_grid.every_n_steps=-1",
     "callbacks.sample_grid.every_n_steps must be a whole number >= 0"),
    ("train-grid-size-zero", f"{TRAIN} callbacks.sample_grid.grid_size=0", "callbacks.sample_grid.grid_size"),
    ("train-checkpoint-every-negative", f"{TRAIN} callbacks.model_checkpoint.every_n_train_steps=-1",
     "every_n_train_steps=-1"),
    ("train-ema-decay", f"{TRAIN} callbacks.ema.decay=2", "callbacks.ema.decay must be in [0, 1]"),
    ("train-ema-every-zero", f"{TRAIN} +callbacks.ema.update_every_n_steps=0",
     "callbacks.ema.update_every_n_steps must be a whole number >= 1"),
    ("train-seed-text", f"{TRAIN} seed=banana", "seed must be a whole number"),
    ("train-misspelt-setting", f"{TRAIN} trainer.max_stepz=3", "'trainer.max_stepz' is not a setting"),
    ("train-not-key-value", f"{TRAIN} trainer.max_steps", "cannot read the argument 'trainer.max_steps'"),
    ("train-unresolvable", TRAIN + " data.batch_size=${{nope}}", "cannot be resolved"),  # ${nope} after format
    ("train-ckpt-foreign", f"{TRAIN} ckpt_path={{files}}/foreign.ckpt", "foreign.ckpt"),
    ("train-ckpt-truncated", f"{TRAIN} ckpt_path={{files}}/truncated.ckpt", "truncated.ckpt"),
    ("train-into-a-run", f"{TRAIN} hydra.run.dir={{run}}", "already holds a run and is never overwritten"),
    # sample.py
    ("sample-no-ckpt", "sample.py progress=false", "no checkpoint given"),
    ("sample-ckpt-foreign", "sample.py ckpt_path={files}/foreign.ckpt", "foreign.ckpt"),
    ("sample-ckpt-truncated", "sample.py ckpt_path={files}/truncated.ckpt", "truncated.ckpt"),
    ("sample-ckpt-directory", "sample.py ckpt_path={tmp}", "is a directory"),
    ("sample-count-negative", f"{SAMPLE} num_samples=-1", "num_samples must be a whole number >= 1"),
    ("sample-batch-zero", f"{SAMPLE} batch_size=0", "batch_size must be a whole number >= 1"),
    ("sample-grid-max-zero", f"{SAMPLE} grid_max=0", "grid_max must be a whole number >= 1"),
    ("sample-mode-unknown", f"{SAMPLE} mode=banana", "unknown mode 'banana'"),
    ("sample-cuda-missing", f"{SAMPLE} device=gpu", "device=gpu asked for but no CUDA GPU is visible"),
    ("sample-device-unknown", f"{SAMPLE} device=banana", "unknown device 'banana'"),
    ("sample-seed-text", f"{SAMPLE} seed=banana", "seed must be a whole number or null"),
    ("sample-switch-text", f"{SAMPLE} use_ema=banana", "use_ema must be true or false"),
    ("sample-steps-zero", f"{SAMPLE} sampler.n_steps_each=0", "sampler.n_steps_each must be an integer >= 1"),
    ("sample-snr-negative", f"{SAMPLE} sampler=pc sampler.snr=-1", "sampler.snr must be > 0"),
    ("sample-trajectory-every-zero", f"{SAMPLE} mode=trajectory trajectory.every=0", "trajectory.every must be"),
    ("sample-inpaint-mask", f"{SAMPLE} mode=inpaint inpaint.mask=banana", "unknown inpaint.mask 'banana'"),
    ("sample-inpaint-count-zero", f"{SAMPLE} mode=inpaint inpaint.num=0", "inpaint.num must be"),
    ("sample-inpaint-too-many", f"{SAMPLE} mode=inpaint inpaint.num=100000", "inpaint.num=100000 asks for more"),
    ("sample-nn-k-zero", f"{SAMPLE} mode=nn nn.k=0", "nn.k must be a whole number >= 1"),
    ("sample-fid-real-one", f"{SAMPLE} mode=fid fid.num_real=1", "fid.num_real must be a whole number >= 2"),
    ("sample-data-dir-missing", f"{SAMPLE} mode=inpaint data_dir={{tmp}}/nowhere", "is not a directory"),
    ("sample-misspelt-setting", f"{SAMPLE} num_sample=4", "'num_sample' is not a setting"),
    ("sample-into-a-run", f"{SAMPLE} hydra.run.dir={{run}}", "already holds a run and is never overwritten"),
    # python -m ncsn.metrics score
    ("score-usage", "-m ncsn.metrics", "usage: python -m ncsn.metrics score"),
    ("score-unknown-option", f"{SCORE} {{files}}/good.npz colour=red", "unknown argument 'colour=red'"),
    ("score-missing", f"{SCORE} {{tmp}}/samples.npz", "does not exist"),
    ("score-directory", f"{SCORE} {{tmp}}", "is a directory"),
    ("score-text-file", f"{SCORE} {{files}}/notes.txt", "is not a readable .npz/.npy file"),
    ("score-truncated", f"{SCORE} {{files}}/truncated.npz", "is not a readable .npz/.npy file"),
    ("score-two-arrays", f"{SCORE} {{files}}/two.npz", "expected one array or one named 'samples'"),
    ("score-no-array", f"{SCORE} {{files}}/empty.npz", "holds no array"),
    ("score-flat", f"{SCORE} {{files}}/flat.npy", "an array of shape (16, 784)"),
    ("score-five-dims", f"{SCORE} {{files}}/five_d.npy", "an array of shape (1, 16, 28, 28, 1)"),
    ("score-3d-points", f"{SCORE} {{files}}/points3.npy", "an array of shape (64, 3)"),
    ("score-float-255", f"{SCORE} {{files}}/float255.npy", "float images must lie in [0, 1] (got 0 to 255)"),
    ("score-float-minus-one", f"{SCORE} {{files}}/minus_one.npy", "with (x + 1) / 2"),
    ("score-uint16", f"{SCORE} {{files}}/uint16.npy", "integer images must lie in [0, 255]"),
    ("score-bool", f"{SCORE} {{files}}/bool.npy", "samples of dtype bool"),
    ("score-complex", f"{SCORE} {{files}}/complex.npy", "samples of dtype complex64"),
    ("score-text-array", f"{SCORE} {{files}}/strings.npy", "samples of dtype <U1"),
    ("score-nan", f"{SCORE} {{files}}/nan.npy", "1 of the 16 samples hold NaN or infinite values"),
    ("score-inf-points", f"{SCORE} {{files}}/inf_points.npy", "hold NaN or infinite values"),
    ("score-one-sample", f"{SCORE} {{files}}/one.npy", "needs at least 2 samples"),
    ("score-pt-two-tensors", f"{SCORE} {{files}}/two.pt", "expected one array or one named 'samples'"),
    ("score-pt-not-a-tensor", f"{SCORE} {{files}}/list.pt", "holds a list, not a tensor"),
    ("score-data-unknown", f"{SCORE} {{files}}/good.npz data=imagenet", "imagenet"),
    ("score-data-missing", f"{SCORE} {{files}}/good.npz data=mnist data_dir={{tmp}}", "data.download=true"),
    ("score-cuda-missing", f"{SCORE} {{files}}/good.npz device=cuda", "device=cuda asked for but no CUDA GPU"),
    ("score-device-unknown", f"{SCORE} {{files}}/good.npz device=banana", "unknown device 'banana'"),
    ("score-weights-missing", f"{SCORE} {{files}}/good.npz inception_weights={{tmp}}/w.pth", "does not exist"),
    # python -m ncsn.tools.convert
    ("convert-two-sources", f"{CONVERT} {{files}}/official.pth", "pass exactly one official checkpoint file"),
    ("convert-no-experiment", "-m ncsn.tools.convert {files}/official.pth out={out}/c.ckpt", "pass experiment=NAME"),
    ("convert-step-negative", f"{CONVERT} step=-1", "step must be a whole number >= 0"),
    ("convert-step-text", f"{CONVERT} step=abc", "step must be a whole number >= 0"),
    ("convert-out-is-a-dir", "-m ncsn.tools.convert {files}/official.pth experiment=mnist_paper out={tmp}",
     "is a directory"),
    ("convert-truncated",
     "-m ncsn.tools.convert {files}/official_truncated.pth experiment=mnist_paper out={out}/c.ckpt",
     "is not an official ncsn/ncsnv2 checkpoint"),
    ("convert-foreign", "-m ncsn.tools.convert {files}/foreign.ckpt experiment=mnist_paper out={out}/c.ckpt",
     "is not an official ncsn/ncsnv2 checkpoint"),
    ("convert-misspelt-setting", f"{CONVERT} model.net.ngff=8", "'model.net.ngff' is not a setting"),
    ("convert-ngf-zero", f"{CONVERT} model.net.ngf=0", "model.net.ngf must be a whole number >= 1"),
    ("convert-experiment-unknown", "-m ncsn.tools.convert {files}/official.pth experiment=banana out={out}/c.ckpt",
     "unknown experiment 'banana'"),
    # python -m ncsn.sigmas
    ("sigmas-unknown-command", "-m ncsn.sigmas sugest", "unknown command 'sugest'"),
    ("sigmas-not-key-value", f"{SIGMAS} steps_each", "expected key=value"),
    ("sigmas-steps-zero", f"{SIGMAS} steps_each=0", "steps_each must be a whole number >= 1"),
    ("sigmas-steps-fraction", f"{SIGMAS} steps_each=2.5", "steps_each must be a whole number"),
    ("sigmas-points-one", f"{SIGMAS} num_points=1", "num_points must be >= 2"),
    ("sigmas-min-zero", f"{SIGMAS} sigma_min=0", "sigma_min must be > 0 and finite"),
    ("sigmas-max-inf", f"{SIGMAS} sigma_max=inf", "sigma_max must be finite and larger than sigma_min"),
    ("sigmas-max-below-min", f"{SIGMAS} sigma_max=0.001", "sigma_max must be finite and larger than sigma_min"),
    ("sigmas-target-one", f"{SIGMAS} target=1", "target must lie strictly between 0 and 1"),
    ("sigmas-target-text", f"{SIGMAS} target=abc", "target must be a number"),
    ("sigmas-data-unknown", f"{SIGMAS} data=imagenet", "unknown data 'imagenet'"),
    ("sigmas-data-missing", f"{SIGMAS} data=mnist paths.data_dir={{tmp}}", "data.download=true"),
    ("sigmas-misspelt-setting", f"{SIGMAS} data.batch_sizes=3", "'data.batch_sizes' is not a setting"),
]
NEEDS_NO_GPU = ("train-cuda-missing", "sample-cuda-missing", "score-cuda-missing")
CONTROL = ("score-valid", f"{SCORE} {{files}}/good.npz")  # the runner itself: a good file scores, exit 0
HYDRA_FILES = {".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "train.log", "sample.log",
               "error.txt"}  # what Hydra writes for any run, and the failure's own record


def write_cli_files(files: Path, ckpt: Path) -> None:
    """The files the CLI cases read: foreign and truncated checkpoints, sample arrays of every wrong kind."""
    files.mkdir(parents=True, exist_ok=True)
    torch.save({"weights": torch.zeros(2)}, files / "foreign.ckpt")
    (files / "truncated.ckpt").write_bytes(ckpt.read_bytes()[:4096])
    torch.save([{"w": torch.zeros(1)}, {"state": {}, "param_groups": []}], files / "official.pth")
    official = (files / "official.pth").read_bytes()
    (files / "official_truncated.pth").write_bytes(official[: len(official) // 2])
    (files / "notes.txt").write_text("not a samples file\n")
    rng = np.random.default_rng(0)
    good = rng.integers(0, 256, (16, 28, 28, 1), dtype=np.uint8)
    np.savez(files / "good.npz", samples=good)
    np.savez(files / "two.npz", a=good, b=good)
    np.savez(files / "empty.npz")
    (files / "truncated.npz").write_bytes((files / "good.npz").read_bytes()[:300])
    floats = good.astype(np.float32) / 255
    arrays = {"flat": good.reshape(16, -1), "five_d": good[None], "points3": rng.normal(size=(64, 3)),
              "float255": floats * 255, "minus_one": floats * 2 - 1, "uint16": good.astype(np.uint16) * 200,
              "bool": good > 128, "complex": good.astype(np.complex64), "strings": np.array(["a"] * 16),
              "nan": np.where(np.arange(16)[:, None, None, None] == 3, np.nan, floats), "one": good[:1],
              "inf_points": np.concatenate([rng.normal(size=(63, 2)), [[np.inf, 0.0]]])}
    for name, array in arrays.items():
        np.save(files / f"{name}.npy", array)
    torch.save({"a": torch.rand(4, 1, 28, 28), "b": torch.rand(4, 1, 28, 28)}, files / "two.pt")
    torch.save([1, 2], files / "list.pt")


@pytest.fixture(scope="module")
def cli_results(trained_run, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("cli")
    ctx = {"ckpt": trained_run / "checkpoints" / "last.ckpt", "run": trained_run, "files": root / "files",
           "tmp": root / "empty"}
    ctx["tmp"].mkdir()
    write_cli_files(ctx["files"], ctx["ckpt"])
    before = sorted(str(p.relative_to(trained_run)) for p in trained_run.rglob("*"))
    cases = []
    for case, command, _ in [*CLI_CASES, (*CONTROL, "")]:
        if case in NEEDS_NO_GPU and torch.cuda.is_available():
            continue
        out = root / "out" / case
        argv = command.format(**ctx, out=out).split()
        if argv[0] in ("train.py", "sample.py") and not any(a.startswith("hydra.run.dir=") for a in argv):
            argv.append(f"hydra.run.dir={out}")
        cases.append({"id": case, "argv": argv, "out": str(out)})
    (root / "cases.json").write_text(json.dumps(cases))
    proc = run_entry("tests/cli_matrix.py", str(root / "cases.json"), str(root / "results.json"), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((root / "results.json").read_text())
    after = sorted(str(p.relative_to(trained_run)) for p in trained_run.rglob("*"))
    results["run files unchanged"] = before == after
    return results


@pytest.mark.parametrize("case, command, fragment", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_every_cli_mistake_is_one_line_exit_2_and_nothing_written(case, command, fragment, cli_results):
    if case in NEEDS_NO_GPU and torch.cuda.is_available():
        pytest.skip("needs a machine without a CUDA GPU")
    result = cli_results[case]
    lines = [line for line in result["stderr"].splitlines() if line.strip()]
    assert result["code"] == 2, (result["code"], result["stderr"][-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines[-3:]
    assert not set(result["files"]) - HYDRA_FILES, result["files"]  # no checkpoint, image, array or json


def test_the_cli_matrix_runs_real_commands_and_leaves_earlier_runs_alone(cli_results):
    assert cli_results["score-valid"]["code"] == 0, cli_results["score-valid"]["stderr"][-2000:]
    assert cli_results["run files unchanged"]


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
                       "model.optimizer.lr=1e12", "trainer.max_steps=200",
                       "callbacks.model_checkpoint.every_n_train_steps=1", f"hydra.run.dir={run}")
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
