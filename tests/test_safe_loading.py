"""Loading a checkpoint someone hands you never runs code from it: every entry point unpickles with
``weights_only=True`` (ncsn.app.checkpoints.read_torch_file) and refuses, before anything is written, a file that
needs any other global, unless the user passes ``trust_checkpoint=true``."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import ROOT, run_entry
from hydra import compose, initialize_config_dir

from ncsn.app.checkpoints import (
    AtomicCheckpointIO,
    UnsafeCheckpointError,
    load_checkpoint,
    read_torch_file,
    trust_flag,
)
from ncsn.app.command_line import precheck_command_line
from ncsn.app.sample import load_model, sample
from ncsn.errors import CheckpointError, ConfigError
from ncsn.tools.official import read_official

# Written by release 57e6228 (the last before safe loading) with
#   python train.py experiment=toy_gmm model.net.hidden=32 trainer.max_steps=4 data.n_train=512 data.n_val=256
#     logger=csv "callbacks.ema={_target_:ncsn.app.ema.EMA,decay:0.9}" callbacks.model_checkpoint.every_n_train_steps=2
#     callbacks.sample_grid.num_samples=200 callbacks.sample_grid.every_n_steps=2
# (its checkpoints/last.ckpt: 94 kB, EMA and quality-pass state included)
PREVIOUS_RELEASE = ROOT / "tests" / "data" / "release_57e6228_toy_gmm.ckpt"
TOY = ["experiment=toy_gmm", "model.net.hidden=32", "logger=none", "callbacks.sample_grid=null",
       "callbacks.progress_bar=null", "callbacks.ema={_target_:ncsn.app.ema.EMA,decay:0.9}", "trainer.max_steps=6"]
SAMPLE_FAST = ["num_samples=8", "batch_size=8", "sampler.n_steps_each=5", "progress=false"]


class _TouchOnLoad:
    """Unpickling this creates ``path``: a stand-in for any code a handed checkpoint could run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.path),)


def handed_checkpoint(path: Path, marker: Path) -> Path:
    """A real checkpoint of ours plus one entry whose unpickling creates ``marker``."""
    ckpt = torch.load(PREVIOUS_RELEASE, map_location="cpu", weights_only=True)
    ckpt["handed"] = _TouchOnLoad(marker)
    torch.save(ckpt, path)
    return path


@pytest.fixture
def handed(tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "code_ran"
    return handed_checkpoint(tmp_path / "handed.ckpt", marker), marker


def first_unsafe_globals(path: Path) -> list[str]:
    return torch.serialization.get_unsafe_globals_in_checkpoint(path)


# ---- our own checkpoints load as they are ------------------------------------------------------------------

def test_checkpoints_of_ours_need_no_global_beyond_the_allowlist(trained_run):
    # the release before this change (toy, EMA) and the current code's tiny image run (NCSN, EMA, quality pass)
    for path in (PREVIOUS_RELEASE, trained_run / "checkpoints" / "last.ckpt"):
        assert first_unsafe_globals(path) == [], path
        ckpt = load_checkpoint(path)  # trust off
        assert ckpt["ncsn_config"]["model"]["_target_"] == "ncsn.app.module.ScoreModel"
        assert ckpt["global_step"] > 0 and "averaging_state" in ckpt


def test_a_checkpoint_of_the_previous_release_samples_without_opting_in(tmp_path, caplog):
    out = tmp_path / "out"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("sample", overrides=[f"ckpt_path={PREVIOUS_RELEASE}", f"paths.output_dir={out}", *SAMPLE_FAST])
    sample(cfg)  # what sample.py runs after its command-line check
    assert "trust_checkpoint" not in caplog.text
    points = np.load(out / "samples.npz")["samples"]
    assert points.shape == (8, 2) and np.isfinite(points).all()
    assert json.loads((out / "sampler.json").read_text())["nfe"] == 10 * 5  # L = 10 levels, T = 5


def test_a_checkpoint_of_the_previous_release_resumes_in_train_py_without_opting_in(tmp_path):
    run = tmp_path / "run"
    result = run_entry("train.py", *TOY, f"ckpt_path={PREVIOUS_RELEASE}", f"hydra.run.dir={run}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "trust_checkpoint" not in result.stdout + result.stderr
    record = json.loads((run / "metrics.json").read_text())
    assert (record["global_step"], record["train_steps"]) == (6, 2)  # continued at step 4, as saved


# ---- a handed checkpoint is refused by every entry point ---------------------------------------------------

# (id, command after `python`, what must not exist afterwards); {ckpt}: the handed file, {out}: a fresh path
ENTRY_POINTS = [
    ("sample.py", "sample.py ckpt_path={ckpt} num_samples=4 hydra.run.dir={out}", "{out}"),
    ("train.py-ckpt_path", "train.py experiment=toy_gmm ckpt_path={ckpt} hydra.run.dir={out}", "{out}"),
    ("train.py-auto_resume", "train.py experiment=toy_gmm auto_resume=true hydra.run.dir={run}", "{run}/.hydra"),
    ("convert", "-m ncsn.tools.convert {ckpt} experiment=toy_gmm out={out}.ckpt", "{out}.ckpt"),
    ("bench-samplers", "bench/samplers.py {ckpt} --out {out}", "{out}"),
]


@pytest.mark.parametrize("command, written", [e[1:] for e in ENTRY_POINTS], ids=[e[0] for e in ENTRY_POINTS])
def test_every_entry_point_refuses_a_handed_checkpoint_in_one_line_before_anything_runs_or_is_written(
        command, written, handed, tmp_path):
    ckpt, marker = handed
    run = tmp_path / "earlier_run"  # auto_resume's run dir: its last.ckpt is the handed file
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(ckpt, run / "checkpoints" / "last.ckpt")
    ctx = {"ckpt": ckpt, "out": tmp_path / "out", "run": run}
    args = command.format(**ctx).split()
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env={**env, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}, check=False)
    lines = [ln for ln in (result.stdout + result.stderr).splitlines() if ln.strip()]
    assert not marker.exists(), "the checkpoint's code ran"
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in result.stderr, lines
    line = lines[0]
    assert line.startswith("error: checkpoint '") and "would run code when loaded" in line, line
    assert line.split("(first: ", 1)[1].split(")", 1)[0] in first_unsafe_globals(ckpt), line
    assert line.endswith("add trust_checkpoint=true"), line
    assert not Path(written.format(**ctx)).exists(), "output written"
    assert sorted(p.name for p in run.rglob("*")) == ["checkpoints", "last.ckpt"]  # the earlier run untouched


def test_trust_checkpoint_true_loads_a_handed_checkpoint_with_a_warning(handed, tmp_path):
    ckpt, marker = handed
    out = tmp_path / "out"
    result = run_entry("sample.py", f"ckpt_path={ckpt}", "trust_checkpoint=true", *SAMPLE_FAST, f"hydra.run.dir={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert marker.exists()  # it ran, as the user allowed
    warnings = [ln for ln in (result.stdout + result.stderr).splitlines() if "trust_checkpoint=true: loading" in ln]
    assert len(warnings) == 1 and "runs any code the file holds" in warnings[0], warnings
    assert (out / "samples.npz").is_file()


# ---- the loaders themselves (what the entry points call; the pre-check only comes first) --------------------

def _lightning_resume_load(path: Path, trust: bool):
    trainer = L.Trainer(plugins=[AtomicCheckpointIO()], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    return trainer.strategy.load_checkpoint(path, weights_only=not trust)  # what Trainer.fit(ckpt_path=) calls


LOADERS = {
    "load_checkpoint": lambda path, trust: load_checkpoint(path, trust=trust),
    "load_model": lambda path, trust: load_model(path, trust=trust),
    "lightning_resume": _lightning_resume_load,
    "read_official": lambda path, trust: read_official(path, trust=trust),
}


@pytest.mark.parametrize("loader", list(LOADERS))
def test_each_loader_refuses_a_handed_checkpoint_and_loads_it_only_when_trusted(loader, handed):
    ckpt, marker = handed
    with pytest.raises(UnsafeCheckpointError, match="would run code when loaded"):
        LOADERS[loader](ckpt, False)
    assert not marker.exists()
    try:
        LOADERS[loader](ckpt, True)
    except CheckpointError as err:  # read_official read it, then found an ncsn checkpoint, not an official one
        assert loader == "read_official" and "already an ncsn checkpoint" in str(err)
    assert marker.exists()


def test_precheck_refuses_before_hydra_unless_trusted_and_leaves_other_problems_to_the_loader(handed, tmp_path):
    ckpt, _ = handed
    conf = ROOT / "conf"
    with pytest.raises(UnsafeCheckpointError):
        precheck_command_line(conf, [f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'a'}"])
    precheck_command_line(conf, [f"ckpt_path={ckpt}", "trust_checkpoint=True", f"hydra.run.dir={tmp_path / 'a'}"])
    precheck_command_line(conf, [f"ckpt_path={tmp_path / 'missing.ckpt'}", f"hydra.run.dir={tmp_path / 'b'}"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_pickle_without_a_named_global_is_refused_with_torchs_reason(tmp_path):
    path = tmp_path / "protocol4.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path, pickle_protocol=4)  # opcodes the safe loader lacks
    with pytest.warns(UserWarning, match="protocol 4"), pytest.raises(UnsafeCheckpointError) as err:
        read_torch_file(path)
    assert "safe loader refuses (Unsupported operand" in str(err.value) and "trust_checkpoint=true" in str(err.value)


def test_trust_checkpoint_accepts_only_true_or_false():
    assert trust_flag(True) is True and trust_flag("FALSE") is False and trust_flag("true") is True
    with pytest.raises(ConfigError, match="trust_checkpoint must be true or false"):
        trust_flag("yes")
