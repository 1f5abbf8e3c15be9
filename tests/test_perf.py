"""The fast path (ncsn.perf): one switch, same samples, bounded bf16 error. CPU tests run everywhere; the CUDA
ones (graph capture, compile, fused Adam, the sync-free non-finite check) are skipped without a GPU."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from ncsn.app.common import instantiate
from ncsn.app.module import ScoreModel
from ncsn.data.datasets import gmm_perturbed_score
from ncsn.errors import ConfigError
from ncsn.nets import NCSN, ConditionalInstanceNorm2dPlus, NCSNv2, ToyScoreMLP, score_function
from ncsn.perf import (
    FastForward,
    PerfSettings,
    enable_compile_cache,
    fp32_norms,
    graphed_sample,
    optimizer_kwargs,
    prepare_net,
    resolve,
)
from ncsn.samplers import annealed_langevin, build_plan, fill_noise, run_plan
from ncsn.sigmas import geometric_sigmas

ROOT = Path(__file__).resolve().parents[1]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

#: stated bound on the per-level relative L2 error of the fast path's score (bf16 autocast + channels_last)
BF16_SCORE_REL_ERROR = 0.03
N_TOY = 2000


@pytest.fixture(autouse=True)
def _one_thread():
    # small ops on a shared 2-core runner are many times faster single-threaded (no OpenMP spinning)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cpu_fast(**overrides) -> PerfSettings:
    """The fast path forced on for the CPU, without torch.compile (inductor's C++ build is slow)."""
    return PerfSettings(enabled=True, compile=False, **overrides).resolve("cpu")


def toy_sigmas() -> torch.Tensor:
    return geometric_sigmas(20.0, 1.0, 10)


def share_in_small_mode(x: torch.Tensor) -> float:
    return (x.sum(dim=1) < 0).float().mean().item()


def toy_init(n: int = N_TOY, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 2, generator=torch.Generator().manual_seed(seed)) * 16 - 8


# ---------------------------------------------------------------------------------------------- the switch
def test_auto_resolves_off_on_cpu_and_on_for_cuda():
    auto = PerfSettings()
    assert auto.enabled == "auto"
    assert auto.resolve("cpu").enabled is False
    assert not any([auto.resolve("cpu").bf16, auto.resolve("cpu").compile, auto.resolve("cpu").cuda_graphs])
    on = auto.resolve("cuda")
    assert on.enabled is True and on.cuda_graphs and on.fused_optimizer and on.compile and on.channels_last
    # forced on for the CPU: the CUDA-only parts stay off
    forced = PerfSettings(enabled=True).resolve("cpu")
    assert forced.enabled is True and forced.bf16 and not forced.cuda_graphs and not forced.fused_optimizer
    assert PerfSettings(enabled=False).resolve("cuda").enabled is False
    # None (the Python default of ScoreModel) means off everywhere
    assert resolve(None, "cuda").enabled is False
    # inductor's own CUDA graphs replace ours
    assert not PerfSettings(compile_mode="reduce-overhead").resolve("cuda").cuda_graphs


@pytest.mark.parametrize("bad", [{"enabled": "sometimes"}, {"enabled": 3}, {"turbo": True}])
def test_bad_perf_settings_raise_config_error(bad):
    with pytest.raises(ConfigError):
        PerfSettings.from_config(bad)


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=["paths.output_dir=/tmp/unused", "experiment=mnist_paper", *overrides])


@pytest.mark.parametrize("choice, enabled", [(None, "auto"), ("fast", True), ("off", False)])
def test_perf_config_group_reaches_the_module(choice, enabled):
    cfg = compose_train(*([f"perf={choice}"] if choice else []))
    model = instantiate(cfg.model)
    assert model.perf.enabled == enabled
    assert model.perf_settings("cpu").enabled is (enabled is True)
    # every perf file spells out exactly the PerfSettings fields
    assert set(OmegaConf.to_container(cfg.perf)) == {f.name for f in dataclasses.fields(PerfSettings)}


@pytest.mark.parametrize("model_choice", ["ncsnv2", "mlp"])
def test_every_model_config_takes_the_perf_switch(model_choice):
    cfg = compose_train(f"model={model_choice}", "perf=fast", "perf.compile=false")
    assert cfg.model.perf.enabled is True and cfg.model.perf.compile is False


# ---------------------------------------------------------------------------------------------- sampler equivalence
def mixture_score(sigmas):
    def score(x, noise):  # level indices, or σ values (the few-step samplers)
        sigma = noise if noise.dtype.is_floating_point else sigmas[noise]
        return gmm_perturbed_score(x, sigma[:, None])

    return score


def test_fill_noise_draws_what_randn_draws():
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    buffer = torch.empty(3, 5, 7)
    for t in range(3):
        fill_noise(buffer[t], g1)
    assert torch.equal(buffer, torch.stack([torch.randn(5, 7, generator=g2) for _ in range(3)]))


SAMPLER_SETTINGS = [
    {"name": "ald", "n_steps_each": 7, "step_lr": 0.05, "denoise": False},
    {"name": "ald", "n_steps_each": 3, "step_lr": 0.05, "denoise": True},
    {"name": "pc", "n_corrector": 2, "snr": 0.16, "denoise": True},
    {"name": "cas", "n_steps_each": 2, "step_lr": 0.5, "denoise": True},
    {"name": "cas", "n_steps_each": 2, "step_lr": 0.8, "denoise": True, "num_levels": 4},
    {"name": "euler", "num_steps": 6},
    {"name": "heun", "num_steps": 6},
    {"name": "heun", "num_steps": 6, "corrector_steps": 2},
    {"name": "dpmpp_2m", "num_steps": 6},
    {"name": "euler_ancestral", "num_steps": 6},
    {"name": "edm", "num_steps": 6, "s_churn": 10.0, "s_tmin": 0.0, "s_tmax": 100.0},
]


@pytest.mark.parametrize("settings", SAMPLER_SETTINGS, ids=lambda s: f"{s['name']}")
def test_graph_replay_loop_equals_the_eager_sampler_exactly_for_every_sampler(settings, monkeypatch):
    # The CUDA path's loop (static buffers, level and coefficient copies, noise drawn into the buffer, one
    # replay per level, the final update's own graph, the memory buffer) with the updates run eagerly at each
    # replay: bit for bit the eager sampler's samples.
    from ncsn.perf import graphs as perf

    sigmas = toy_sigmas()
    score = mixture_score(sigmas)
    plan = build_plan(sigmas, settings)
    monkeypatch.setattr(perf, "_graph_capable", lambda x: True)
    x0 = toy_init(64)
    eager = run_plan(plan, score, x0, sigmas, generator=torch.Generator().manual_seed(1))
    cache: dict = {}
    replayed = graphed_sample(plan, score, x0, sigmas, generator=torch.Generator().manual_seed(1), cache=cache)
    graphs = [v for v in cache.values() if isinstance(v, perf._LevelGraph)]
    assert {g.update for g in graphs} == {u for u in (plan.update, plan.final_update) if u is not None}
    assert torch.equal(eager, replayed)


def test_graphed_sampler_off_cuda_is_the_eager_sampler_with_the_default_generator_and_an_image_network():
    torch.manual_seed(0)
    net = NCSN(in_channels=1, image_size=8, ngf=4, num_scales=3).eval()
    sigmas = geometric_sigmas(1.0, 0.1, 3)
    score = score_function(net, sigmas)
    x0 = torch.rand(2, 1, 8, 8)
    torch.manual_seed(5)
    eager = annealed_langevin(score, x0, sigmas, 4, 2e-5)
    torch.manual_seed(5)
    graphed = graphed_sample(build_plan(sigmas, {"n_steps_each": 4, "step_lr": 2e-5}), score, x0, sigmas)
    assert torch.equal(eager, graphed)


def test_a_callback_falls_back_to_the_eager_sampler_and_sees_every_step(monkeypatch):
    from ncsn.perf import graphs as perf

    monkeypatch.setattr(perf, "_graph_capable", lambda x: True)
    monkeypatch.setattr(perf, "_get_graphs", lambda *a, **k: pytest.fail("no graph with a callback"))
    sigmas = toy_sigmas()
    seen = []
    plan = build_plan(sigmas, {"n_steps_each": 3, "step_lr": 0.05})
    out = graphed_sample(plan, mixture_score(sigmas), toy_init(8), sigmas, generator=torch.Generator().manual_seed(0),
                         callback=lambda d: seen.append((d["level"], d["step"])))
    assert seen == [(i, t) for i in range(10) for t in range(3)]
    assert out.shape == (8, 2)


# ---------------------------------------------------------------------------------------------- statistics
def test_paper_toy_mode_weights_with_a_bf16_rounded_score_match_fp32():
    # The paper's toy (sigma 20 -> 1, L = 10, T = 100, step_lr 0.05, U[-8, 8]^2, 2,000 samples): a score whose
    # input and output go through bf16 (the rounding a bf16 network adds), run by the fast path's sampler,
    # recovers the same mode weights as the exact fp32 score with the eager sampler.
    sigmas = toy_sigmas()

    def bf16_score(x, levels):
        s = gmm_perturbed_score(x.bfloat16().float(), sigmas[levels][:, None].bfloat16().float())
        return s.bfloat16().float()

    x0 = toy_init()
    fp32 = annealed_langevin(mixture_score(sigmas), x0, sigmas, 100, 0.05, generator=torch.Generator().manual_seed(1))
    plan = build_plan(sigmas, {"n_steps_each": 100, "step_lr": 0.05})
    fast = graphed_sample(plan, bf16_score, x0, sigmas, generator=torch.Generator().manual_seed(2))
    w_fp32, w_fast = share_in_small_mode(fp32), share_in_small_mode(fast)
    assert w_fp32 == pytest.approx(0.2, abs=0.03)
    assert w_fast == pytest.approx(0.2, abs=0.03)
    assert w_fast == pytest.approx(w_fp32, abs=0.03)


@pytest.fixture(scope="module")
def toy_mlp() -> ToyScoreMLP:
    """A ToyScoreMLP regressed onto the analytic mixture score (seconds; no DSM training needed)."""
    torch.manual_seed(0)
    sigmas = toy_sigmas()
    net = ToyScoreMLP(dim=2, hidden=64, num_scales=10, num_layers=2)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(600):
        levels = torch.randint(0, 10, (512,))
        sig = sigmas[levels][:, None]
        x = torch.rand(512, 2) * 30 - 15
        loss = (net(x, levels) - sig * gmm_perturbed_score(x, sig)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def test_toy_module_fast_path_mode_weights_match_the_fp32_path(toy_mlp):
    sampler = {"n_steps_each": 100, "step_lr": 0.05, "init_low": -8.0, "init_high": 8.0}
    plain = ScoreModel(copy.deepcopy(toy_mlp), toy_sigmas(), [2], sampler=sampler)
    fast = ScoreModel(copy.deepcopy(toy_mlp), toy_sigmas(), [2], sampler=sampler, perf=cpu_fast())
    assert plain.perf_settings().enabled is False and fast.perf_settings().bf16
    w_plain = share_in_small_mode(plain.sample(N_TOY, generator=torch.Generator().manual_seed(3)))
    w_fast = share_in_small_mode(fast.sample(N_TOY, generator=torch.Generator().manual_seed(3)))
    assert w_plain == pytest.approx(0.2, abs=0.07)  # the regressed MLP is a decent score
    assert w_fast == pytest.approx(w_plain, abs=0.03)


@pytest.mark.parametrize("net_cls", [NCSN, NCSNv2])
def test_fast_score_of_a_small_image_network_is_within_the_stated_error_per_level(net_cls):
    torch.manual_seed(0)
    net = net_cls(in_channels=3, image_size=16, ngf=8, num_scales=10).eval()
    sigmas = geometric_sigmas(1.0, 0.01, 10)
    reference = score_function(copy.deepcopy(net), sigmas)
    fast_net = FastForward(prepare_net(net, cpu_fast()), cpu_fast(), "cpu")
    fast = score_function(fast_net, sigmas)
    with torch.no_grad():
        for level in range(10):
            x = torch.rand(4, 3, 16, 16)
            levels = torch.full((4,), level)
            ref, out = reference(x, levels), fast(x, levels)
            assert out.dtype == torch.float32 and out.is_contiguous()
            rel = ((out - ref).norm() / ref.norm()).item()
            assert rel < BF16_SCORE_REL_ERROR, f"level {level}: relative error {rel:.4f}"


def test_channels_last_alone_keeps_fp32_results():
    torch.manual_seed(0)
    net = NCSN(in_channels=3, image_size=16, ngf=8, num_scales=10).eval()
    x, levels = torch.rand(4, 3, 16, 16), torch.arange(4)
    with torch.no_grad():
        ref = net(x, levels)
        settings = cpu_fast(bf16=False)
        out = FastForward(prepare_net(net, settings), settings, "cpu")(x, levels)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- norms in fp32
def test_fp32_norms_keep_parameters_and_exact_fp32_results():
    torch.manual_seed(0)
    net = NCSN(in_channels=1, image_size=8, ngf=4, num_scales=3).eval()
    x, levels = torch.rand(2, 1, 8, 8), torch.tensor([0, 2])
    state = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        before = net(x, levels)
        patched = fp32_norms(net)
        assert patched > 0 and fp32_norms(net) == 0  # idempotent
        assert torch.equal(net(x, levels), before)
    assert list(net.state_dict()) == list(state)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
    copy.deepcopy(net)  # the patched forwards survive a deepcopy (EMA)


def test_instance_norm_plus_statistics_are_fp32_under_bf16_autocast():
    # Channel means 64 +- 0.5: in bf16 (spacing 0.5 at 64) their differences -- what InstanceNorm++ adds back --
    # round away. The fast path computes the statistics in fp32 from the same bf16 activations.
    torch.manual_seed(0)
    norm = ConditionalInstanceNorm2dPlus(32, 10)
    guarded = copy.deepcopy(norm)
    fp32_norms(guarded)
    x = (64 + 0.5 * torch.randn(4, 32, 1, 1) + 4 * torch.randn(4, 32, 16, 16)).bfloat16()  # a bf16 conv output
    levels = torch.arange(4)
    reference = norm(x.float(), levels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, fast = norm(x, levels), guarded(x, levels)
    assert fast.dtype == torch.float32
    assert ((fast - reference).norm() / reference.norm()).item() < 1e-5
    assert ((plain.float() - reference).norm() / reference.norm()).item() > 0.05  # what the guard prevents


# ---------------------------------------------------------------------------------------------- the module
def tiny_image_model(perf) -> ScoreModel:
    torch.manual_seed(0)
    net = NCSN(in_channels=1, image_size=8, ngf=4, num_scales=3)
    return ScoreModel(net, geometric_sigmas(1.0, 0.1, 3), [1, 8, 8],
                      sampler={"n_steps_each": 2, "step_lr": 2e-5}, perf=perf)


def test_module_with_perf_on_trains_a_step_and_samples(tmp_path):
    model = tiny_image_model(cpu_fast())
    keys = list(model.state_dict())
    data = DataLoader(TensorDataset(torch.rand(8, 1, 8, 8)), batch_size=4)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=tmp_path)
    before = model.net.begin_conv.weight.detach().clone()
    trainer.fit(model, train_dataloaders=data)
    assert trainer.global_step == 2
    assert not torch.equal(model.net.begin_conv.weight, before)
    assert model.net.res1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert list(model.state_dict()) == keys  # checkpoints stay interchangeable with perf=off
    samples = model.sample(3, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (3, 1, 8, 8) and torch.isfinite(samples).all()
    # the same weights without the fast path give nearly the same samples (same noise; bf16 score)
    plain = tiny_image_model(None)
    plain.load_state_dict(model.state_dict())
    reference = plain.sample(3, generator=torch.Generator().manual_seed(0))
    assert (samples - reference).abs().max().item() < 1e-2


def test_perf_off_module_is_the_plain_path():
    model = tiny_image_model({"enabled": False})
    x, levels = torch.rand(2, 1, 8, 8), torch.tensor([0, 1])
    with torch.no_grad():
        assert torch.equal(model.score_fn(x, levels), score_function(model.net, model.sigmas)(x, levels))
    assert model.net.begin_conv.weight.is_contiguous()
    assert not any(getattr(m, "_ncsn_fp32_norm", False) for m in model.net.modules())


def test_prepared_module_deepcopies_with_a_fresh_runtime():
    model = tiny_image_model(cpu_fast())
    model.sample(2)
    assert model._perf.forwards
    clone = copy.deepcopy(model)  # what Lightning's EMA callback does
    assert not clone._perf.forwards
    assert clone.sample(2).shape == (2, 1, 8, 8)


def test_fused_optimizer_only_for_cuda_parameters_and_optimizer_partials():
    on = PerfSettings(enabled=True).resolve("cuda")
    adam = functools.partial(torch.optim.Adam, lr=1e-3)
    cpu_params = [torch.nn.Parameter(torch.zeros(2))]
    assert optimizer_kwargs(adam, on, cpu_params) == {}
    assert optimizer_kwargs(lambda p: torch.optim.Adam(p), on, cpu_params) == {}
    assert optimizer_kwargs(adam, PerfSettings(enabled=False).resolve("cuda"), cpu_params) == {}
    assert optimizer_kwargs(functools.partial(torch.optim.Adam, fused=False), on, cpu_params) == {}
    model = tiny_image_model(cpu_fast())
    assert not model.configure_optimizers().defaults.get("fused")


# ---------------------------------------------------------------------------------------------- compile (slow on CPU)
@pytest.mark.slow
def test_compiled_fast_forward_is_one_graph_and_trains_with_channels_last():
    # aot_eager runs the AOTAutograd graphs eagerly: it catches graph breaks and the stride mismatch a
    # channels_last activation meeting an NCHW one causes in the compiled backward, without a C++ build.
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = NCSN(in_channels=3, image_size=16, ngf=4, num_scales=10)
    settings = dataclasses.replace(cpu_fast(), compile=True, compile_backend="aot_eager")
    prepare_net(net, settings)
    x, levels = torch.rand(2, 3, 16, 16), torch.tensor([0, 9])
    explained = torch._dynamo.explain(FastForward(net, cpu_fast(), "cpu")._forward)(x, levels)
    assert explained.graph_break_count == 0
    compiled = FastForward(net, settings, "cpu")
    compiled(x, levels).square().mean().backward()
    assert net.begin_conv.weight.grad is not None


# ---------------------------------------------------------------------------------------------- the benchmark
def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / "speed.py"), "--tiny", *args], check=False,
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_bench_tiny_subset_prints_the_table_and_a_ratio_line(tmp_path):
    out = tmp_path / "bench.json"
    result = run_bench("--nets", "mnist", "--sample-batches", "4", "--json", str(out))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith("| net | task |") for line in lines)
    assert [line for line in lines if "ratio" in line] == [
        line for line in lines if line.startswith("ratio fast/baseline mnist")]
    assert sum("ratio" in line for line in lines) == 2  # train@4, sample@4
    assert out.exists()


@pytest.mark.slow
def test_bench_tiny_full_run(tmp_path):  # what `make bench-cpu` runs: ~40-80 s on 2 shared cores
    start = time.time()
    result = run_bench()
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert sum(line.startswith("ratio fast/baseline") for line in result.stdout.splitlines()) == 9  # 3 nets x 3
    print(f"bench --tiny took {time.time() - start:.0f} s")


def _bench_module(stem: str):
    """``bench/<stem>.py`` as a module (loaded once); bench/ goes on sys.path for the scripts' own imports
    (gpu_check imports bench/quality.py as ``quality``)."""
    import importlib.util

    name = f"ncsn_bench_{stem}"
    if name not in sys.modules:
        if str(ROOT / "bench") not in sys.path:
            sys.path.insert(0, str(ROOT / "bench"))
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{stem}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_bench_net_specs_follow_the_official_samplers():
    speed = _bench_module("speed")
    assert set(speed.NETS) == {"cifar10", "mnist", "cifar10_ncsnv2"}
    v2 = speed.NETS["cifar10_ncsnv2"]
    assert (v2.net_class, v2.shape, v2.ngf, v2.num_scales, v2.n_steps_each, v2.step_lr, v2.denoise) == (
        NCSNv2, (3, 32, 32), 128, 232, 5, 6.2e-6, True)
    assert v2.evals_per_image == 232 * 5 + 1 == 1161
    assert [speed.NETS[n].evals_per_image for n in ("cifar10", "mnist")] == [1000, 1000]
    sigmas = v2.sigmas()
    assert sigmas[0].item() == pytest.approx(50.0) and sigmas[-1].item() == pytest.approx(0.01)
    # 50 steps timed: NCSNv2 keeps T = 5 at 10 levels spread over its 232, the first and the last included
    timed, per_level = v2.timed_schedule(50)
    assert per_level == 5 and len(timed) == 10
    assert timed[0].item() == pytest.approx(50.0) and timed[-1].item() == pytest.approx(0.01)
    assert torch.all(timed[1:] < timed[:-1])
    # the paper networks: 5 steps at each of their 10 levels (as before the NCSNv2 rows existed)
    timed, per_level = speed.NETS["cifar10"].timed_schedule(50)
    assert per_level == 5 and torch.equal(timed, speed.NETS["cifar10"].sigmas())


def test_bench_tiny_runs_all_three_nets_and_extrapolates_ncsnv2_to_1161_evaluations(tmp_path):
    out = tmp_path / "bench.json"
    result = run_bench("--sample-batches", "4", "--json", str(out))  # default --nets: all three
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["meta"]["evals_per_image"] == {"cifar10": 1000, "mnist": 1000, "cifar10_ncsnv2": 1161}
    rows = {(r["net"], r["task"], r["batch"]): r for r in data["results"]}
    assert set(rows) == {(n, t, b) for n in ("cifar10", "mnist", "cifar10_ncsnv2")
                         for t, b in (("train", 4), ("sample", 4))}
    sample = rows["cifar10_ncsnv2", "sample", 4]
    for path in ("baseline", "fast"):
        r = sample[path]
        # --tiny: 10 steps timed = T 5 at 2 of the 232 levels, + the denoising step
        assert (r["measured_levels"], r["steps_per_level"], r["measured_evals"]) == (2, 5, 11)
        assert r["extrapolated_to_evals"] == 1161
        assert r["images_per_s"] == pytest.approx(4 / (r["measured_s"] / 11 * 1161))
    assert sample["ratio"] == pytest.approx(sample["fast"]["images_per_s"] / sample["baseline"]["images_per_s"])
    assert rows["cifar10", "sample", 4]["fast"]["extrapolated_to_evals"] == 1000
    assert rows["cifar10_ncsnv2", "train", 4]["baseline"]["images_per_s"] > 0
    assert "ratio fast/baseline cifar10_ncsnv2 sample@4" in result.stdout


def test_profile_step_tiny_prints_both_kernel_groups(tmp_path):
    out = tmp_path / "profile.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "profile_step.py"), "--tiny", "--json", str(out)],
                            check=False, capture_output=True, text=True, timeout=600, cwd=ROOT,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stdout.splitlines()
    for group in ("convolution", "other", "total"):
        assert sum(line.startswith(f"| {group} |") for line in lines) == 2  # batches 4 and 8
    assert sum(line.startswith("top 15 non-convolution kernels") for line in lines) == 2
    results = json.loads(out.read_text())["results"]
    assert [r["batch"] for r in results] == [4, 8]
    for r in results:
        assert r["ms_per_step"]["convolution"] > 0 and r["ms_per_step"]["other"] > 0
        assert r["total_ms_per_step"] == pytest.approx(sum(r["ms_per_step"].values()))
        assert 0 < len(r["top_other"]) <= 15
        assert all("conv" not in k["name"].lower() for k in r["top_other"])


# ---------------------------------------------------------------------------------------------- compile cache
@pytest.fixture
def clean_compile_cache_env(monkeypatch, tmp_path):
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    for name in ("TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    # torch's config modules: patch() restores them (monkeypatch.setattr's undo would delete the setting)
    with contextlib.ExitStack() as stack:
        stack.enter_context(inductor_config.patch(fx_graph_cache=False))
        if hasattr(functorch_config, "enable_autograd_cache"):
            stack.enter_context(functorch_config.patch(enable_autograd_cache=False))
        yield inductor_config, functorch_config


def test_compile_cache_takes_torchs_own_default_dir_as_unset(clean_compile_cache_env, tmp_path, monkeypatch):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what importing inductor's config writes
    assert enable_compile_cache()["cache_dir"] == str((tmp_path / "xdg" / "ncsn" / "inductor").resolve())


def test_compile_cache_defaults_to_a_persistent_user_dir_and_turns_the_caches_on(clean_compile_cache_env, tmp_path):
    inductor_config, functorch_config = clean_compile_cache_env
    settings = enable_compile_cache()
    expected = tmp_path / "xdg" / "ncsn" / "inductor"
    assert expected.is_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == settings["cache_dir"] == str(expected.resolve())
    assert inductor_config.fx_graph_cache is True and settings["fx_graph_cache"] is True
    if hasattr(functorch_config, "enable_autograd_cache"):
        assert functorch_config.enable_autograd_cache is True and settings["autograd_cache"] is True
    assert enable_compile_cache() == settings  # idempotent


def test_compile_cache_respects_torchinductor_cache_dir(clean_compile_cache_env, tmp_path, monkeypatch):
    inductor_config, _ = clean_compile_cache_env
    mine = tmp_path / "mine"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(mine))
    settings = enable_compile_cache(tmp_path / "other")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == settings["cache_dir"] == str(mine)
    assert not (tmp_path / "other").exists() and not (tmp_path / "xdg").exists()
    assert inductor_config.fx_graph_cache is True  # the caches still go on, in the user's dir


def test_compile_cache_respects_a_user_switch_for_the_fx_graph_cache(clean_compile_cache_env, monkeypatch):
    inductor_config, _ = clean_compile_cache_env
    monkeypatch.setenv("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
    assert enable_compile_cache()["fx_graph_cache"] is False
    assert inductor_config.fx_graph_cache is False


def test_fast_forward_turns_the_compile_cache_on_only_when_it_compiles(clean_compile_cache_env, tmp_path):
    net = ToyScoreMLP()
    FastForward(net, PerfSettings(enabled=True, compile=False).resolve("cpu"), "cpu")
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    FastForward(net, PerfSettings(enabled=True, compile=True).resolve("cpu"), "cpu")  # compiles lazily: not here
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str((tmp_path / "xdg" / "ncsn" / "inductor").resolve())


# ---------------------------------------------------------------------------------------------- GPU only
def _cuda_net(num_scales: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    return NCSN(in_channels=3, image_size=16, ngf=8, num_scales=num_scales).cuda().eval()


@cuda
@pytest.mark.parametrize("settings", [{"name": "ald", "n_steps_each": 5, "step_lr": 2e-5, "denoise": True},
                                      {"name": "pc", "n_corrector": 1}, {"name": "cas", "step_lr": 9e-5}],
                         ids=lambda s: s["name"])
def test_cuda_graph_sampler_equals_the_eager_sampler(settings):
    net = _cuda_net()
    sigmas = geometric_sigmas(1.0, 0.01, 4).cuda()
    score = score_function(net, sigmas)
    x0 = torch.rand(6, 3, 16, 16, device="cuda")
    plan = build_plan(sigmas, settings)
    eager = run_plan(plan, score, x0, sigmas, generator=torch.Generator("cuda").manual_seed(1))
    cache: dict = {}
    for _ in range(2):  # the second call replays the cached graph
        graphed = graphed_sample(plan, score, x0, sigmas, cache=cache, generator=torch.Generator("cuda").manual_seed(1))
        torch.testing.assert_close(graphed, eager, rtol=1e-4, atol=1e-4)
    assert any(v is not None for k, v in cache.items() if k != "token")


@cuda
def test_cuda_fast_module_compiles_graphs_and_matches_fp32_statistics():
    sigmas = geometric_sigmas(1.0, 0.01, 4)
    net = NCSN(in_channels=3, image_size=16, ngf=8, num_scales=4)
    plain = ScoreModel(copy.deepcopy(net), sigmas, [3, 16, 16], sampler={"n_steps_each": 5}).cuda()
    fast = ScoreModel(copy.deepcopy(net), sigmas, [3, 16, 16], sampler={"n_steps_each": 5},
                      perf={"enabled": "auto"}).cuda()
    settings = fast.perf_settings()
    assert settings.enabled and settings.compile and settings.cuda_graphs
    a = plain.sample(16, generator=torch.Generator("cuda").manual_seed(0))
    b = fast.sample(16, generator=torch.Generator("cuda").manual_seed(0))
    assert (a - b).abs().max().item() < 1e-2
    assert fast.sample(16).shape == (16, 3, 16, 16)  # graph reuse
    optimizer = fast.configure_optimizers()
    assert optimizer.defaults.get("fused") is True
    loss = fast.compute_loss(torch.rand(8, 3, 16, 16, device="cuda")).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)


@cuda
def test_cuda_nonfinite_loss_is_caught_before_the_update_without_a_sync_in_backward(tmp_path):
    from ncsn.app.module import NonFiniteLossError

    model = ScoreModel(NCSN(in_channels=1, image_size=8, ngf=4, num_scales=3), geometric_sigmas(1.0, 0.1, 3),
                       [1, 8, 8], perf={"enabled": True, "compile": False}, optimizer=functools.partial(
                           torch.optim.Adam, lr=1e-3))
    data = DataLoader(TensorDataset(torch.full((4, 1, 8, 8), float("nan"))), batch_size=4)
    trainer = L.Trainer(accelerator="gpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    before = copy.deepcopy(model.net.state_dict())
    with pytest.raises(NonFiniteLossError):
        trainer.fit(model, train_dataloaders=data)
    after = model.net.state_dict()
    assert all(torch.equal(before[k].cpu(), after[k].cpu()) for k in before)


def _check_record(experiment: str, degenerate: float) -> dict:
    gpu_check = _bench_module("gpu_check")
    record = {"experiment": experiment, "budget_seconds": 300, "num_samples": 1000, "sample_wall_s": 12.0,
              "degenerate": degenerate, "class_shares": [0.1] * 10, "frechet": 4.0, "ratio": 2.0, "floor": 2.0,
              "kid": 0.05, "kid_std": 0.01}
    record["targets"] = gpu_check.quality.targets(record, gpu_check.targets_kind(experiment))
    return record


@pytest.mark.parametrize("experiment, degenerate, verdict", [
    ("mnist", 0.005, "PASS"), ("mnist", 0.015, "FAIL"),  # the GPU recipe's target: < 1 % degenerate
    ("cpu", 0.015, "PASS"),  # the CPU recipe is judged by its own targets (< 2 %), not the GPU's
])
def test_gpu_check_names_the_experiment_and_its_targets_and_a_fail_is_a_failed_command(experiment, degenerate,
                                                                                       verdict):
    gpu_check = _bench_module("gpu_check")
    record = _check_record(experiment, degenerate)
    text = gpu_check.verdict(record, {"metrics": {}})
    assert text.splitlines()[0].startswith(f"GPU check: experiment={experiment}, 300 s of training")
    assert f"{gpu_check.targets_kind(experiment)} targets" in text.splitlines()[0]
    assert text.splitlines()[-1] == f"VERDICT: {verdict}"
    assert gpu_check.passed(record) is (verdict == "PASS")  # main() exits 0 only then
