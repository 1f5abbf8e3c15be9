"""The CPU kernel choice (ncsn.app.cpu_kernels, issue 37): measured once per machine and network, cached, applied
before torch starts, and never timed where the user or the machine leaves nothing to choose.

The timings are mocked (a fake timer that counts its calls) except in the tests of the measuring subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_entry
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ncsn.app import cpu_kernels as ck
from ncsn.app.cpu_timing import KERNEL_SETS

CONF = ROOT / "conf"
TWO_SETS = ("processor\t: 0\nmodel name\t: Test CPU 9000\n"
            "flags\t\t: fpu sse sse2 avx fma avx2 avx512f avx512dq avx512bw avx512vl\n")
AVX2_ONLY = "processor\t: 0\nmodel name\t: Test CPU 2000\nflags\t\t: fpu sse sse2 avx fma avx2\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes\nCPU implementer\t: 0x41\n"


class FakeTimer:
    """Seconds per step by kernel set name; counts the sets it was asked to time."""

    def __init__(self, seconds: dict[str, dict[str, float]]):
        self.seconds = seconds
        self.calls: list[str] = []

    def __call__(self, kset: ck.KernelSet, workload: ck.Workload) -> dict[str, float]:
        self.calls.append(kset.name)
        return dict(self.seconds[kset.name])


# AVX2 1.5x faster at training, 2x at sampling (as on the AMD EPYC, a bit more)
AVX2_FASTER = {"avx512": {"train": 0.15, "sample": 0.10}, "avx2": {"train": 0.10, "sample": 0.05}}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No kernel variables, no GPU, the cache in tmp_path; everything set by the test is undone after it."""
    for name in (*ck.USER_VARIABLES, ck.CHOSEN, ck.SWITCH):
        monkeypatch.setenv(name, "x")  # so that monkeypatch also removes what the code under test sets
        monkeypatch.delenv(name)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("NCSN_CACHE_DIR", str(tmp_path / "cache"))


def decide(argv, lines, timer, cpuinfo=TWO_SETS):
    return ck.decide("train", argv, CONF, say=lines.append, cpuinfo=cpuinfo, timer=timer)


def test_the_cache_is_written_once_and_reused(tmp_path):
    timer, lines = FakeTimer(AVX2_FASTER), []
    first = decide(["experiment=cpu"], lines, timer)
    assert sorted(timer.calls) == ["avx2", "avx512"]
    assert first.env == {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert first.line.startswith("AVX2 kernels: 1.50x faster here than AVX-512 at a training step")
    cache = ck.cache_path()
    assert cache == tmp_path / "cache" / "cpu_kernels.json"
    (key, entry), = json.loads(cache.read_text()).items()
    assert key.startswith("Test CPU 9000 | torch ") and "NCSNv2(" in key and "ngf=8" in key and "32x1x28x28" in key
    assert entry["seconds_per_step"] == AVX2_FASTER

    lines.clear()
    again = decide(["experiment=cpu"], lines, timer)
    assert len(timer.calls) == 2, "the second run timed again instead of reading the cache"
    assert again == first and lines == []
    # the entry holds sample.py's choice too (sampling: 2x); another network is measured anew
    sampling = ck.choose(entry, ck.offered_kernel_sets(TWO_SETS), "sample", cache)
    assert sampling.line.startswith("AVX2 kernels: 2.00x faster here than AVX-512 at sampling")
    decide(["experiment=cpu", "model.net.ngf=16"], lines, timer)
    assert len(timer.calls) == 4 and len(json.loads(cache.read_text())) == 2


def test_timings_too_far_apart_for_kernel_sets_keep_the_default_and_are_not_cached():
    # a busy 2-core machine once timed AVX2 47x slower than AVX-512 (idle: within 1.2x): other work, not kernels
    timer, lines = FakeTimer({"avx512": {"train": 0.13, "sample": 0.4}, "avx2": {"train": 6.1, "sample": 1.3}}), []
    choice = decide(["experiment=cpu"], lines, timer)
    assert choice.env == {} and "disturbed" in choice.line
    assert any("differ 47x" in line and "nothing is cached" in line for line in lines)
    assert not ck.cache_path().exists() or json.loads(ck.cache_path().read_text()) == {}
    decide(["experiment=cpu"], lines, timer)
    assert len(timer.calls) == 4  # measured again on the next run


@pytest.mark.parametrize("content, why", [
    ("{not json", "unreadable"),
    ('["a", "list"]', "unreadable"),
    (None, "stale"),  # an entry for this key from another cache version
])
def test_a_corrupt_or_stale_cache_is_ignored_with_one_line(content, why):
    cache = ck.cache_path()
    cache.parent.mkdir(parents=True)
    if content is None:
        ck.decide("train", ["experiment=cpu"], CONF, say=lambda _: None, cpuinfo=TWO_SETS, timer=FakeTimer(AVX2_FASTER))
        entries = json.loads(cache.read_text())
        for entry in entries.values():
            entry["version"] = 0
            entry["seconds_per_step"] = {"avx512": {"train": 0.01, "sample": 0.01}}
        content = json.dumps(entries)
    cache.write_text(content)
    timer, lines = FakeTimer(AVX2_FASTER), []
    choice = decide(["experiment=cpu"], lines, timer)
    assert sorted(timer.calls) == ["avx2", "avx512"]
    assert [line for line in lines if "cache" in line.lower() and why in line] == [lines[0]]
    assert len(lines) == 2 and lines[1].startswith("timing PyTorch's AVX-512 and AVX2 CPU kernels")
    assert choice.env["ATEN_CPU_CAPABILITY"] == "avx2"
    assert len(json.loads(cache.read_text())) == 1  # rewritten whole


@pytest.mark.parametrize("name, value", [("ATEN_CPU_CAPABILITY", "avx512"), ("ONEDNN_MAX_CPU_ISA", "AVX2")])
def test_an_explicit_environment_setting_wins_and_nothing_is_timed(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    timer, lines = FakeTimer(AVX2_FASTER), []
    assert decide(["experiment=cpu"], lines, timer) is None
    assert timer.calls == [] and not ck.cache_path().exists()
    assert lines == [f"CPU kernels as the environment sets them ({name}={value}): nothing timed"]
    assert os.environ[name] == value and ck.CHOSEN not in os.environ


@pytest.mark.parametrize("cpuinfo, expected", [
    (AVX2_ONLY, ["AVX2 kernels, the only set PyTorch has for this CPU: nothing timed"]),
    (ARM, []),  # no x86 kernel sets at all: nothing to say
])
def test_a_cpu_with_one_kernel_set_times_nothing(cpuinfo, expected):
    timer, lines = FakeTimer(AVX2_FASTER), []
    assert decide(["experiment=cpu"], lines, timer, cpuinfo=cpuinfo) is None
    assert timer.calls == [] and lines == expected and not ck.cache_path().exists()


def test_perf_off_keeps_the_defaults_even_in_the_cpu_recipe():
    """experiment=cpu turns the fast path on; perf=off on the command line still wins (and nothing is timed)."""
    timer, lines = FakeTimer(AVX2_FASTER), []
    assert decide(["experiment=cpu", "perf=off"], lines, timer) is None
    assert decide(["perf=off"], lines, timer) is None  # the default experiment picked without a GPU is cpu
    assert timer.calls == [] and lines == ["PyTorch's default CPU kernels (perf=off: nothing timed)"] * 2


def test_a_cuda_run_times_nothing_and_says_nothing_but_trainer_cpu_does(monkeypatch):
    monkeypatch.setattr(ck, "cuda_visible", lambda: True)
    timer, lines = FakeTimer(AVX2_FASTER), []
    assert decide([], lines, timer) is None and decide(["experiment=cpu"], lines, timer) is None
    assert timer.calls == [] and lines == []
    choice = decide(["trainer=cpu"], lines, timer)  # the CPU recipe on the CPU of a GPU machine
    assert choice.kset.name == "avx2" and len(timer.calls) == 2


def test_pytorchs_own_pick_stays_unless_another_set_is_clearly_faster(tmp_path):
    entry = {"measured": "2026-01-02", "seconds_per_step": {"avx512": {"train": 0.102, "sample": 0.08},
                                                            "avx2": {"train": 0.100, "sample": 0.10}}}
    sets = ck.offered_kernel_sets(TWO_SETS)
    train = ck.choose(entry, sets, "train", tmp_path / "c.json")  # AVX2 only 2 % faster: within the noise
    assert train.kset.name == "avx512" and train.env == {}
    assert train.line.startswith("AVX-512 kernels (PyTorch's default): AVX2 is only 1.02x faster here")
    sample = ck.choose(entry, sets, "sample", tmp_path / "c.json")
    assert sample.kset.name == "avx512" and sample.env == {}
    assert sample.line.startswith("AVX-512 kernels (PyTorch's default): 1.25x faster here than AVX2 at sampling")
    assert "measured 2026-01-02" in sample.line and str(tmp_path / "c.json") in sample.line


def test_a_sweep_is_timed_at_its_first_value():
    assert ck.overrides_of(["-m", "model.net.ngf=8,16", "model.optimizer.lr=interval(1e-4,1e-3)", "seed=1",
                            "--cfg", "job"]) == ["model.net.ngf=8", "seed=1"]


def test_the_entry_point_never_fails_and_says_so_in_one_line(monkeypatch):
    def broken(kset, workload):
        raise ck.KernelChoiceError("timing AVX2 failed (boom)")

    monkeypatch.setattr(ck, "time_in_subprocess", broken)
    monkeypatch.setattr(ck, "torch_imported", lambda: False)  # pytest imported torch; the entry points do not
    offered = ck.offered_kernel_sets
    monkeypatch.setattr(ck, "offered_kernel_sets", lambda cpuinfo=None: offered(TWO_SETS))
    lines: list[str] = []
    ck.apply_for_entry_point("train", ["experiment=cpu"], CONF, say=lines.append)
    assert lines[-1] == ("CPU kernel choice failed (KernelChoiceError: timing AVX2 failed (boom)): PyTorch's default "
                         "kernels") and len(lines) == 2  # the "timing ..." notice, then the failure
    assert "ATEN_CPU_CAPABILITY" not in os.environ and os.environ[ck.CHOSEN] == "default"
    lines.clear()  # a child process (DDP) of that run: chosen already, silent
    ck.apply_for_entry_point("train", ["experiment=cpu"], CONF, say=lines.append)
    assert lines == []


def test_switched_off_or_help_is_silent(monkeypatch):
    monkeypatch.setattr(ck, "torch_imported", lambda: False)
    lines: list[str] = []
    monkeypatch.setenv(ck.SWITCH, "off")
    ck.apply_for_entry_point("train", ["experiment=cpu"], CONF, say=lines.append)
    monkeypatch.delenv(ck.SWITCH)
    ck.apply_for_entry_point("train", ["--cfg", "job"], CONF, say=lines.append)
    assert lines == [] and ck.CHOSEN not in os.environ


def test_importing_it_imports_neither_torch_nor_hydra():
    code = ("import sys, ncsn.app.cpu_kernels; "
            "print([m for m in sys.modules if m.split('.')[0] in ('torch', 'hydra', 'lightning', 'omegaconf')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _offered_here() -> list[str]:
    return [k.name for k in ck.offered_kernel_sets()]


@pytest.mark.skipif("avx2" not in _offered_here(), reason="this CPU has no AVX2")
def test_the_choice_reaches_torch_in_a_child_process():
    """ATen and oneDNN both run AVX2 kernels in a process started with the chosen environment."""
    entry = {"seconds_per_step": AVX2_FASTER}
    sets = [k for k in KERNEL_SETS if k.name in ("avx512", "avx2")]
    env = dict(os.environ)
    ck.apply(ck.choose(entry, sets, "train", Path("c.json")), environ=env)
    assert env[ck.CHOSEN] == "avx2"
    code = ("import torch\n"
            "with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):\n"
            "    torch.nn.functional.conv2d(torch.rand(2, 16, 32, 32), torch.rand(16, 16, 3, 3))\n"
            "from ncsn.app.cpu_timing import describe_kernels\n"
            "print('capability', torch.backends.cpu.get_cpu_capability(), flush=True)\n"
            "print('table says', describe_kernels(), flush=True)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert "capability AVX2" in out and "table says AVX2 kernels" in out  # bench/samplers.py's title
    assert "isa:Intel AVX2" in out and "jit:avx2" in out  # oneDNN's convolution


@pytest.mark.skipif(len(_offered_here()) < 2, reason="this CPU offers one kernel set")
def test_sample_py_applies_the_cached_choice_for_its_run_before_torch_starts(tmp_path, monkeypatch):
    """Through the real entry point: sample.py reads the run's network from <run>/.hydra/config.yaml, finds the
    cache entry train.py would have written and says which kernels run, before anything else."""
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        OmegaConf.save(compose("train", overrides=["experiment=cpu"]), run / ".hydra" / "config.yaml")
    env = {"CUDA_VISIBLE_DEVICES": "", "NCSN_CACHE_DIR": str(tmp_path / "cache"), ck.SWITCH: "auto"}
    workload, _ = ck.workload_from_config(OmegaConf.load(run / ".hydra" / "config.yaml"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as run_entry starts sample.py (the thread setting is in the key)
    key = ck.cache_key(workload)
    cache = tmp_path / "cache" / "cpu_kernels.json"
    ck.write_cache(cache, {key: {"version": ck.CACHE_VERSION, "measured": "2026-01-02",
                                 "seconds_per_step": {"avx512": AVX2_FASTER["avx512"], "avx2": AVX2_FASTER["avx2"]}}})
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / "metrics.json").write_text("{}")  # sample.py stops there, before it imports torch
    result = run_entry("sample.py", f"ckpt_path={run}/checkpoints/last.ckpt", f"hydra.run.dir={tmp_path}/earlier",
                       env=env, timeout=120)
    assert result.stderr.splitlines()[0] == (
        f"ncsn: AVX2 kernels: 2.00x faster here than AVX-512 at sampling with this network (measured 2026-01-02, "
        f"cache {cache})")
    assert result.returncode == 2 and "already holds a run" in result.stderr  # sample.py's own check, unchanged


@pytest.mark.slow
@pytest.mark.skipif(len(_offered_here()) < 2, reason="this CPU offers one kernel set")
def test_the_measuring_subprocess_runs_each_kernel_set(tmp_path):
    """The real timer on a toy network: one subprocess per set, each checked to run the set it was asked for."""
    workload = ck.Workload(net={"_target_": "ncsn.nets.ToyScoreMLP", "dim": 2, "hidden": 16, "num_scales": 4},
                           data_shape=(2,), batch=8)
    seconds = ck.measure(workload, ck.offered_kernel_sets())
    assert sorted(seconds) == sorted(_offered_here())
    assert all(0 < s[w] < 1 for s in seconds.values() for w in ("train", "sample"))
