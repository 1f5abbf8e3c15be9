"""ncsn.tools.convert: official ermongroup/ncsn and ermongroup/ncsnv2 checkpoints into ours.

ermongroup/ncsn files are built from the OFFICIAL network's parameter names, shapes and order, kept as data in
tests/data/ermongroup_ncsn_parameters.txt (read off models/cond_refinenet_dilated.py), not from our network:
random tensors and Adam moments under those names, keyed by the official order, ``nn.DataParallel``'s ``module.``
prefix, the legacy (pre-1.6) torch format with integer Adam steps. Those files hold no σ list; the official one
(configs/anneal.yml: σ 1 -> 0.01, L = 10) is data here too. ermongroup/ncsnv2 files are built from our NCSNv2
(its names are ours) with the ``sigmas`` buffer, the epoch and step counters and the EMA helper's shadow dict
(names without ``module.``); the LSUN and FFHQ files likewise from our NCSNv2Deeper and NCSNv2Deepest, whose
names tests/test_nets_deeper.py checks against the official ones. Nothing is downloaded.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, run_entry
from fakes import parameter_table
from hydra import compose, initialize_config_dir

from ncsn.app.common import instantiate
from ncsn.app.sample import load_model
from ncsn.tools.convert import main as convert_main

NCSN_EXP = ["experiment=mnist_paper", "model.net.ngf=8"]
V2_EXP = ["experiment=cifar10_ncsnv2", "model.net.ngf=8"]
ADAM_STEPS = 3
V2_EPOCH, V2_STEP = 4, 11
#: ermongroup/ncsn configs/anneal.yml (commit 80899cd), ``model``: the σ list of every ermongroup/ncsn model
OFFICIAL_ANNEAL = {"sigma_begin": 1.0, "sigma_end": 0.01, "num_classes": 10}
PARAMETER_TABLE = Path(__file__).parent / "data" / "ermongroup_ncsn_parameters.txt"


def official_parameters(ngf: int, channels: int = 1) -> dict[str, tuple[int, ...]]:
    """ermongroup/ncsn's CondRefineNetDilated parameters (name -> shape) in the official order, from the table."""
    return parameter_table(PARAMETER_TABLE, ngf, channels)


def official_ncsn_contents(ngf: int = 8, channels: int = 1, seed: int = 0) -> tuple[OrderedDict, dict]:
    """Random weights under the official names (official order) and the official Adam state for them: keyed by
    official position, integer steps (torch < 1.6), moments of each parameter's shape."""
    gen = torch.Generator().manual_seed(seed)
    weights = OrderedDict((n, 0.05 * torch.randn(shape, generator=gen))
                          for n, shape in official_parameters(ngf, channels).items())
    state = {i: {"step": ADAM_STEPS, "exp_avg": torch.randn(t.shape, generator=gen),
                 "exp_avg_sq": torch.rand(t.shape, generator=gen)} for i, t in enumerate(weights.values())}
    group = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False,
             "params": list(range(len(weights)))}
    return weights, {"state": state, "param_groups": [group]}


def build_model(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["paths.output_dir=/tmp/unused", *overrides])
    return instantiate(cfg.model)


def adam_after_steps(net: torch.nn.Module, steps: int = ADAM_STEPS, seed: int = 0) -> torch.optim.Adam:
    """Adam after a few steps on random gradients: every parameter gets its own moments."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        for p in net.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return opt


def ncsnv2_adam_state(opt: torch.optim.Adam) -> dict:
    """``opt.state_dict()`` as ermongroup/ncsnv2 saves it (its parameter order is ours)."""
    ours = opt.state_dict()
    state = {i: {k: v.clone() for k, v in entry.items()} for i, entry in ours["state"].items()}
    group = {k: v for k, v in ours["param_groups"][0].items()
             if k in ("lr", "betas", "eps", "weight_decay", "amsgrad", "params")}
    return {"state": state, "param_groups": [group]}


def write_ermongroup_ncsn(path: Path, weights: OrderedDict, adam: dict, *, drop: str | None = None,
                          add: str | None = None) -> Path:
    """``[score.state_dict(), optimizer.state_dict()]`` as runners/anneal_runner.py saves it (legacy format)."""
    state = OrderedDict((f"module.{n}", t) for n, t in weights.items() if n != drop)
    if add:
        state[f"module.{add}"] = torch.zeros(3)
    torch.save([state, adam], path, _use_new_zipfile_serialization=False)
    return path


def write_ermongroup_ncsnv2(path: Path, net: torch.nn.Module, opt: torch.optim.Adam, sigmas: torch.Tensor,
                            shadow: dict[str, torch.Tensor] | None) -> Path:
    """``[score.state_dict(), optimizer.state_dict(), epoch, step, (ema_helper.state_dict())]`` as
    runners/ncsn_runner.py saves it: the ``sigmas`` buffer first, EMA names without ``module.``."""
    state = OrderedDict([("module.sigmas", sigmas.clone())])
    state.update((f"module.{n}", p.detach().clone()) for n, p in net.named_parameters())
    items = [state, ncsnv2_adam_state(opt), V2_EPOCH, V2_STEP]
    if shadow is not None:
        items.append(shadow)
    torch.save(items, path)
    return path


@pytest.fixture(scope="module")
def ncsn_source(tmp_path_factory):
    """An ermongroup/ncsn file of its MNIST network at ngf 8, with its weights and Adam state."""
    weights, adam = official_ncsn_contents(ngf=8)
    path = write_ermongroup_ncsn(tmp_path_factory.mktemp("official") / "checkpoint.pth", weights, adam)
    return path, weights, adam


@pytest.fixture(scope="module")
def ncsnv2_source(tmp_path_factory):
    """An ermongroup/ncsnv2 file of an NCSNv2 (CIFAR-10, ngf 8, σ 50 -> 0.01, L = 232) with EMA weights."""
    torch.manual_seed(1)
    model = build_model(*V2_EXP)
    net = model.net
    opt = adam_after_steps(net, seed=1)
    gen = torch.Generator().manual_seed(2)
    shadow = {n: p.detach() + 0.05 * torch.randn(p.shape, generator=gen) for n, p in net.named_parameters()}
    path = write_ermongroup_ncsnv2(tmp_path_factory.mktemp("official") / "checkpoint_11.pth", net, opt,
                                   model.sigmas, shadow)
    return path, net, opt, shadow, model.sigmas


def run_convert(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``python -m ncsn.tools.convert args...`` as a user runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "ncsn.tools.convert", *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=cwd, check=False)


def convert_in_process(capsys, *args: str) -> tuple[int, str, str]:
    try:
        convert_main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def net_state(state: dict) -> dict:
    return {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}


def assert_moments_by_name(ckpt: dict, our_names: list[str], moments: dict[str, dict], steps: int) -> None:
    """Every parameter's Adam moments in the converted checkpoint (keyed by OUR position, ``our_names``: the
    ScoreModel's parameter names) are the source's for THAT parameter (``moments``: network name -> entry)."""
    state = ckpt["optimizer_states"][0]["state"]
    assert sorted(state) == list(range(len(our_names)))
    for index, name in enumerate(our_names):
        source = moments[name[len("net."):]]
        assert torch.equal(state[index]["exp_avg"], source["exp_avg"]), name
        assert torch.equal(state[index]["exp_avg_sq"], source["exp_avg_sq"]), name
        assert int(state[index]["step"]) == steps


def official_moments(weights: OrderedDict, adam: dict) -> dict[str, dict]:
    return {name: adam["state"][i] for i, name in enumerate(weights)}


def our_moments(net: torch.nn.Module, opt: torch.optim.Adam) -> dict[str, dict]:
    return {name: opt.state[param] for name, param in net.named_parameters()}


def our_parameter_names(*overrides: str) -> list[str]:
    return [n for n, _ in build_model(*overrides).named_parameters()]


def max_abs_diff(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor, levels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a(x, levels) - b(x, levels)).abs().max())


# ---------------------------------------------------------------------------------------------- round trips
def test_ermongroup_ncsn_file_converts_exactly_and_sample_py_draws_from_it(ncsn_source, tmp_path):
    src, weights, adam = ncsn_source
    out = tmp_path / "ncsn_mnist.ckpt"
    result = run_convert(str(src), *NCSN_EXP, f"out={out}")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Adam's step count" in result.stdout and f"global_step {ADAM_STEPS}" in result.stdout
    assert "configs/anneal.yml" in result.stdout

    ckpt = load(out)
    expected = build_model(*NCSN_EXP).state_dict()
    assert list(ckpt["state_dict"]) == list(expected)  # ScoreModel keys: sigmas + net.*
    assert all(torch.equal(ckpt["state_dict"][k], ckpt["current_model_state"][k]) for k in expected)  # no EMA
    for name, tensor in weights.items():  # every official tensor lands under its own name
        assert torch.equal(ckpt["state_dict"][f"net.{name}"], tensor), name
    begin, end, n = OFFICIAL_ANNEAL["sigma_begin"], OFFICIAL_ANNEAL["sigma_end"], OFFICIAL_ANNEAL["num_classes"]
    official_sigmas = torch.tensor(np.exp(np.linspace(np.log(begin), np.log(end), n)), dtype=torch.float32)
    assert torch.allclose(ckpt["state_dict"]["sigmas"], official_sigmas, rtol=1e-6)
    assert ckpt["global_step"] == ADAM_STEPS and ckpt["ncsn_config"]["run_name"] == "mnist_paper"
    assert ckpt["ncsn_config"]["model"]["net"]["ngf"] == 8 and ckpt["lr_schedulers"] == []
    assert int(ckpt["averaging_state"]["n_averaged"]) == 0
    assert ckpt["ncsn_converted_from"]["format"] == "ermongroup/ncsn"
    assert_moments_by_name(ckpt, our_parameter_names(*NCSN_EXP), official_moments(weights, adam), ADAM_STEPS)

    model, _ = load_model(out)
    for name, tensor in model.net.state_dict().items():
        assert torch.equal(tensor, weights[name]), name

    run_dir = tmp_path / "samples"
    result = run_entry("sample.py", f"ckpt_path={out}", "num_samples=4", "batch_size=4", "sampler.n_steps_each=1",
                       "progress=false", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    samples = np.load(run_dir / "samples.npz")["samples"]
    assert samples.shape == (4, 28, 28, 1) and samples.std() > 0


@pytest.mark.parametrize(("experiment", "ngf", "channels"), [("mnist_paper", 64, 1), ("cifar10_paper", 128, 3),
                                                             ("celeba_paper", 128, 3)])
def test_the_paper_networks_have_the_official_parameter_names_and_shapes(experiment, ngf, channels):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["paths.output_dir=/tmp/unused", f"experiment={experiment}"])
    with torch.device("meta"):  # names and shapes only
        net = instantiate(cfg.model.net)
    assert {n: tuple(p.shape) for n, p in net.named_parameters()} == dict(official_parameters(ngf, channels))
    assert not list(net.buffers())


def test_adam_moments_follow_the_parameter_names_not_positions(ncsn_source, tmp_path, capsys):
    """ermongroup/ncsn's parameter order differs from ours in every CRP block: the moments must move with it."""
    src, weights, adam = ncsn_source
    ours = [n[len("net."):] for n in our_parameter_names(*NCSN_EXP)]
    moved = [n for n, o in zip(weights, ours) if n != o]
    assert sorted(ours) == sorted(weights) and moved and all(".crp." in n for n in moved)
    code, _, err = convert_in_process(capsys, str(src), *NCSN_EXP, f"out={tmp_path / 'c.ckpt'}", "step=500")
    assert code == 0, err
    ckpt = load(tmp_path / "c.ckpt")
    assert ckpt["global_step"] == 500  # step= wins over Adam's count
    assert_moments_by_name(ckpt, our_parameter_names(*NCSN_EXP), official_moments(weights, adam), ADAM_STEPS)


def test_converted_checkpoint_inpaints_from_the_data_of_its_experiment(ncsn_source, tmp_path):
    """mode=inpaint reads the validation images through the data config stored in the converted checkpoint."""
    from ncsn.app.sample import sample
    from ncsn.tools.convert import convert

    out = convert(ncsn_source[0], NCSN_EXP, tmp_path / "c.ckpt", echo=lambda *_: None)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("sample", overrides=[f"ckpt_path={out}", f"paths.output_dir={tmp_path / 'inpaint'}",
                                           "mode=inpaint", "inpaint.num=2", "inpaint.num_completions=2",
                                           "sampler.n_steps_each=1", "progress=false"])
    files = sample(cfg)
    arrays = np.load(files["array"])
    assert arrays["completions"].shape == (4, 28, 28, 1) and arrays["originals"].shape == (2, 28, 28, 1)
    left = arrays["completions"].reshape(2, 2, 28, 28, 1)[:, :, :, :14].astype(int)
    assert np.abs(left - arrays["originals"][:, None, :, :14].astype(int)).max() <= 1  # the known half kept


def test_ermongroup_ncsnv2_file_places_ema_and_raw_weights_and_sample_py_draws(ncsnv2_source, tmp_path, capsys):
    src, net, opt, shadow, sigmas = ncsnv2_source
    out = tmp_path / "v2.ckpt"
    code, stdout, err = convert_in_process(capsys, str(src), *V2_EXP, f"out={out}")
    assert code == 0, err
    assert "sigma list matches" in stdout and "EMA weights found" in stdout

    ckpt = load(out)
    assert ckpt["global_step"] == V2_STEP and ckpt["epoch"] == V2_EPOCH + 1
    ema, raw = net_state(ckpt["state_dict"]), net_state(ckpt["current_model_state"])
    for name, param in net.named_parameters():
        assert torch.equal(ema[name], shadow[name]) and torch.equal(raw[name], param.detach()), name
    assert torch.equal(ckpt["state_dict"]["sigmas"], sigmas)
    assert int(ckpt["averaging_state"]["n_averaged"]) == V2_STEP
    assert {"latest_update_step": V2_STEP} in ckpt["callbacks"].values()
    assert_moments_by_name(ckpt, our_parameter_names(*V2_EXP), our_moments(net, opt), ADAM_STEPS)

    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    levels = torch.tensor([0, 100, 231])
    raw_model, _ = load_model(out, use_ema=False)
    assert max_abs_diff(raw_model.net, net, x, levels) == 0.0
    ema_net = build_model(*V2_EXP).net
    ema_net.load_state_dict(shadow)
    ema_model, _ = load_model(out)  # use_ema=True, as sample.py by default
    assert max_abs_diff(ema_model.net, ema_net, x, levels) == 0.0

    run_dir = tmp_path / "samples"
    result = run_entry("sample.py", f"ckpt_path={out}", "num_samples=2", "batch_size=2", "sampler.n_steps_each=1",
                       "progress=false", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert np.load(run_dir / "samples.npz")["samples"].shape == (2, 32, 32, 3)


def test_ermongroup_ncsnv2_file_without_ema_uses_the_raw_weights(ncsnv2_source, tmp_path, capsys):
    _, net, opt, _, sigmas = ncsnv2_source
    no_ema = write_ermongroup_ncsnv2(tmp_path / "checkpoint.pth", net, opt, sigmas, shadow=None)
    code, _, err = convert_in_process(capsys, str(no_ema), *V2_EXP, f"out={tmp_path / 'o.ckpt'}")
    assert code == 0, err
    ckpt = load(tmp_path / "o.ckpt")
    for name, param in net.named_parameters():
        assert torch.equal(net_state(ckpt["state_dict"])[name], param.detach())
        assert torch.equal(net_state(ckpt["current_model_state"])[name], param.detach())
    assert int(ckpt["averaging_state"]["n_averaged"]) == 0


@pytest.mark.parametrize(("recipe", "model"), [("church_ncsnv2", "ncsnv2_deeper"), ("ffhq_ncsnv2", "ncsnv2_deepest")])
def test_official_lsun_and_ffhq_networks_convert_exactly(recipe, model, tmp_path, capsys):
    """ermongroup/ncsnv2's NCSNv2Deeper (LSUN) and NCSNv2Deepest (FFHQ) files, into their experiments (at ngf 4): raw
    and EMA weights by name, the Adam moments by name, the same outputs as the network that wrote them."""
    experiment = [f"experiment={recipe}", "model.net.ngf=4"]
    torch.manual_seed(6)
    source = build_model(*experiment)
    net = source.net
    opt = adam_after_steps(net, seed=6)
    shadow = {n: p.detach() + 0.01 * torch.randn_like(p) for n, p in net.named_parameters()}
    src = write_ermongroup_ncsnv2(tmp_path / "checkpoint_11.pth", net, opt, source.sigmas, shadow)
    out = tmp_path / f"{model}.ckpt"
    code, stdout, err = convert_in_process(capsys, str(src), *experiment, f"out={out}")
    assert code == 0, err
    kind = "NCSNv2Deepest" if model == "ncsnv2_deepest" else "NCSNv2Deeper"
    assert f"tensors of an {kind} (model={model}" in stdout and "EMA weights found" in stdout

    ckpt = load(out)
    ema, raw = net_state(ckpt["state_dict"]), net_state(ckpt["current_model_state"])
    assert set(raw) == {n for n, _ in net.named_parameters()}
    for name, param in net.named_parameters():
        assert torch.equal(ema[name], shadow[name]) and torch.equal(raw[name], param.detach()), name
    assert_moments_by_name(ckpt, our_parameter_names(*experiment), our_moments(net, opt), ADAM_STEPS)
    raw_model, _ = load_model(out, use_ema=False)
    assert type(raw_model.net).__name__ == kind
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    assert max_abs_diff(raw_model.net, net.eval(), x, torch.tensor([0, 231])) == 0.0


# ---------------------------------------------------------------------------------------------- mistakes
ERROR_CASES = {
    "sigma_mismatch": ("v2", [*V2_EXP, "sigmas.num_scales=200"], "sigma list"),
    # the same L = 10 (so the same network), another σ range: ermongroup/ncsn files hold no σ list
    "ncsn_sigma_range": ("ncsn", [*NCSN_EXP, "sigmas.sigma_max=50"],
                         "the sigma list of ermongroup/ncsn models (configs/anneal.yml; "),
    "shape_mismatch": ("ncsn", ["experiment=mnist_paper", "model.net.ngf=16"],
                       "begin_conv.weight is [8, 1, 3, 3] in the file but [16, 1, 3, 3]"),
    "other_network": ("ncsn", V2_EXP, "the file holds a noise-conditional NCSN"),
    "missing_tensor": ("missing", NCSN_EXP, "lacks 1 tensor(s) the network has (first: end_conv.bias)"),
    "extra_tensor": ("extra", NCSN_EXP, "has 1 tensor(s) the network lacks (first: extra.weight)"),
    "deeper_network": ("deeper", V2_EXP, ("the file holds an NCSNv2Deeper (model=ncsnv2_deeper, the LSUN network), "
                                          "the experiment builds an NCSNv2 (model=ncsnv2)")),
    "missing_ema_tensor": ("v2_ema_missing", V2_EXP, "the file's EMA helper lacks 1 tensor"),
    "text_file": ("text", NCSN_EXP, "is not an official ncsn/ncsnv2 checkpoint (torch.load cannot read it"),
    "other_torch_file": ("dict", NCSN_EXP, "is not an official ncsn/ncsnv2 checkpoint (a dict with keys weights"),
    "already_ours": ("ours", NCSN_EXP, "is already an ncsn checkpoint"),
    "no_experiment": ("ncsn", ["model.net.ngf=8"], "pass experiment=NAME"),
    "unknown_experiment": ("ncsn", ["experiment=imagenet"], "unknown experiment 'imagenet'"),
    "out_exists": ("ncsn", NCSN_EXP, "already exists and is never overwritten"),
    "missing_source": ("nothing", NCSN_EXP, "does not exist"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_every_mismatch_is_one_line_exit_2_and_nothing_written(case, ncsn_source, ncsnv2_source, tmp_path, capsys):
    kind, overrides, expected = ERROR_CASES[case]
    _, weights, adam = ncsn_source
    src = tmp_path / "checkpoint.pth"
    if kind == "ncsn":
        src = ncsn_source[0]
    elif kind == "v2":
        src = ncsnv2_source[0]
    elif kind == "missing":
        write_ermongroup_ncsn(src, weights, adam, drop="end_conv.bias")
    elif kind == "extra":
        write_ermongroup_ncsn(src, weights, adam, add="extra.weight")
    elif kind == "deeper":  # the LSUN network has a fifth encoder stage
        deeper = build_model(*V2_EXP, "model=ncsnv2_deeper")
        write_ermongroup_ncsnv2(src, deeper.net, adam_after_steps(deeper.net), deeper.sigmas, shadow=None)
    elif kind == "v2_ema_missing":
        _, v2_net, v2_opt, shadow, sigmas = ncsnv2_source
        write_ermongroup_ncsnv2(src, v2_net, v2_opt, sigmas, {k: v for k, v in list(shadow.items())[1:]})
    elif kind == "text":
        src.write_text("not a checkpoint\n")
    elif kind == "dict":
        torch.save({"weights": torch.zeros(2)}, src)
    elif kind == "ours":
        torch.save({"state_dict": {}, "ncsn_config": {}}, src)
    out = tmp_path / "out" / "converted.ckpt"
    if case == "out_exists":
        out.parent.mkdir()
        out.write_bytes(b"an earlier file")
    code, _, err = convert_in_process(capsys, str(src), *overrides, f"out={out}")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0]
    if case == "out_exists":
        assert out.read_bytes() == b"an earlier file"
    else:
        assert not out.exists()
    assert not out.with_name(out.name + ".part").exists()


def test_cli_error_is_one_line_without_traceback(tmp_path):
    bad = tmp_path / "notes.pth"
    bad.write_text("hello")
    result = run_convert(str(bad), *NCSN_EXP, f"out={tmp_path / 'o.ckpt'}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in result.stderr
    assert not (tmp_path / "o.ckpt").exists()


# ---------------------------------------------------------------------------------------------- fine-tuning
@pytest.mark.slow
@pytest.mark.parametrize("official", ["ncsn", "ncsnv2"])
def test_train_py_fine_tunes_a_converted_checkpoint_from_the_official_step(official, tmp_path):
    """train.py ckpt_path=<converted> continues at the official step with the official Adam moments (and, for
    NCSNv2, the official EMA) on real-format CIFAR-10 files."""
    from fakes import write_cifar

    data = tmp_path / "data"
    write_cifar(data, per_batch=4, n_test=4)
    experiment = ["experiment=cifar10_paper", "model.net.ngf=8"] if official == "ncsn" else V2_EXP
    torch.manual_seed(5)
    model = build_model(*experiment, f"paths.data_dir={data}")
    opt = adam_after_steps(model.net)
    if official == "ncsn":
        src = write_ermongroup_ncsn(tmp_path / "checkpoint.pth", *official_ncsn_contents(ngf=8, channels=3))
        start = ADAM_STEPS
    else:
        shadow = {n: p.detach() + 0.01 for n, p in model.net.named_parameters()}
        src = write_ermongroup_ncsnv2(tmp_path / "checkpoint.pth", model.net, opt, model.sigmas, shadow)
        start = V2_STEP
    converted = tmp_path / "converted.ckpt"
    result = run_convert(str(src), *experiment, f"out={converted}")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]

    run_dir = tmp_path / "run"
    result = run_entry(
        "train.py", *experiment, f"ckpt_path={converted}", f"trainer.max_steps={start + 2}", "trainer.accelerator=cpu",
        f"paths.data_dir={data}", "++data.verify_checksums=false", "data.batch_size=4", "data.num_workers=0",
        "data.pin_memory=false", "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0",
        "logger=csv", "callbacks.progress_bar=null", "callbacks.sample_grid=null", f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    after = load(run_dir / "checkpoints" / "last.ckpt")
    assert after["global_step"] == start + 2
    adam_steps = {int(s["step"]) for s in after["optimizer_states"][0]["state"].values()}
    assert adam_steps == {ADAM_STEPS + 2}, "Adam continues from the official moments"
    if official == "ncsnv2":
        assert int(after["averaging_state"]["n_averaged"]) == V2_STEP + 2
        ema = net_state(after["state_dict"])
        raw = net_state(after["current_model_state"])
        assert not torch.equal(ema["begin_conv.weight"], raw["begin_conv.weight"])
