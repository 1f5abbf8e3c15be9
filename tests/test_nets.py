"""Tests for the score networks in ncsn.nets (CPU, fast)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ncsn.nets import NCSN, NCSNv2, ToyScoreMLP, score_function

NETS_DIR = Path(__file__).resolve().parents[1] / "src" / "ncsn" / "nets"
SRC_DIR = NETS_DIR.parents[1]
FORBIDDEN = ("lightning", "pytorch_lightning", "hydra", "omegaconf")


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Big networks: built once per module.
@pytest.fixture(scope="module")
def ncsn_cifar() -> NCSN:
    torch.manual_seed(0)
    return NCSN(in_channels=3, image_size=32, ngf=128, num_scales=10).eval()


@pytest.fixture(scope="module")
def ncsn_mnist() -> NCSN:
    torch.manual_seed(0)
    return NCSN(in_channels=1, image_size=28, ngf=64, num_scales=10).eval()


@pytest.fixture(scope="module")
def ncsnv2_cifar() -> NCSNv2:
    torch.manual_seed(0)
    return NCSNv2(in_channels=3, image_size=32, ngf=128).eval()


# ----------------------------------------------------------------------------- parameter counts


def test_param_count_ncsn_cifar(ncsn_cifar):
    assert n_params(ncsn_cifar) == 30_117_635


def test_param_count_ncsn_mnist(ncsn_mnist):
    assert n_params(ncsn_mnist) == 7_638_657


def test_param_count_ncsnv2_cifar(ncsnv2_cifar):
    assert n_params(ncsnv2_cifar) == 29_694_083


# ----------------------------------------------------------------------------- shapes


@torch.no_grad()
def test_shape_mnist_28(ncsn_mnist):
    x = torch.rand(2, 1, 28, 28)
    levels = torch.tensor([0, 9])
    assert ncsn_mnist(x, levels).shape == x.shape
    v2 = NCSNv2(in_channels=1, image_size=28, ngf=16).eval()
    assert v2(x, levels).shape == x.shape


@torch.no_grad()
def test_shape_cifar_32(ncsn_cifar, ncsnv2_cifar):
    x = torch.rand(2, 3, 32, 32)
    levels = torch.tensor([0, 9])
    out = ncsn_cifar(x, levels)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out = ncsnv2_cifar(x, levels)
    assert out.shape == x.shape and torch.isfinite(out).all()


@torch.no_grad()
@pytest.mark.parametrize("cls", [NCSN, NCSNv2])
def test_shape_64(cls):
    net = cls(in_channels=3, image_size=64, ngf=16, num_scales=10).eval()
    x = torch.rand(2, 3, 64, 64)
    assert net(x, torch.tensor([1, 2])).shape == x.shape


@torch.no_grad()
def test_mlp_shape():
    net = ToyScoreMLP(dim=2, hidden=32, num_scales=10, num_layers=3)
    x = torch.randn(5, 2)
    assert net(x, torch.arange(5)).shape == x.shape


# ----------------------------------------------------------------------------- conditioning


@torch.no_grad()
def test_ncsn_conditioning_on_levels():
    net = NCSN(in_channels=3, image_size=32, ngf=16, num_scales=10).eval()
    x = torch.rand(1, 3, 32, 32).expand(2, -1, -1, -1).contiguous()

    same = net(x, torch.tensor([3, 3]))
    torch.testing.assert_close(same[0], same[1])  # per-sample computation, no batch coupling

    # At init gamma/alpha ~ N(1, 0.02) per level, so levels already differ a little ...
    out = net(x, torch.tensor([0, 9]))
    assert not torch.allclose(out[0], out[1])

    # ... and clearly once the embeddings move away from their initialisation.
    for module in net.modules():
        if isinstance(module, torch.nn.Embedding):
            module.weight.add_(0.3 * torch.randn_like(module.weight))
    out = net(x, torch.tensor([0, 9]))
    assert (out[0] - out[1]).abs().mean() > 1e-2 * out.abs().mean()


@torch.no_grad()
def test_ncsnv2_ignores_levels():
    net = NCSNv2(in_channels=3, image_size=32, ngf=8).eval()
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(net(x, torch.tensor([0, 1])), net(x, torch.tensor([5, 9])))


@torch.no_grad()
def test_rescale_input_flag():
    torch.manual_seed(1)
    a = NCSNv2(in_channels=3, image_size=32, ngf=8, rescale_input=True).eval()
    b = NCSNv2(in_channels=3, image_size=32, ngf=8, rescale_input=False).eval()
    b.load_state_dict(a.state_dict())
    x = torch.rand(2, 3, 32, 32)
    levels = torch.tensor([0, 0])
    torch.testing.assert_close(a(x, levels), b(2 * x - 1, levels))


def test_all_parameters_receive_gradients():
    net = NCSN(in_channels=1, image_size=28, ngf=8, num_scales=4)
    x = torch.rand(2, 1, 28, 28)
    net(x, torch.tensor([0, 3])).square().mean().backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None]
    # Catches modules that are built (and counted) but never used in forward.
    assert not missing


# ----------------------------------------------------------------------------- score_function


def test_divide_by_sigma_flags():
    assert NCSN.divide_by_sigma is False
    assert NCSNv2.divide_by_sigma is True
    assert ToyScoreMLP.divide_by_sigma is True


@torch.no_grad()
@pytest.mark.parametrize(
    "net, shape",
    [
        (lambda: NCSNv2(in_channels=3, image_size=32, ngf=8), (3, 3, 32, 32)),
        (lambda: ToyScoreMLP(dim=2, hidden=16, num_scales=10), (3, 2)),
    ],
)
def test_score_function_divides_by_sigma(net, shape):
    net = net().eval()
    sigmas = torch.logspace(0, -2, 10)
    x = torch.rand(*shape)
    levels = torch.tensor([0, 4, 9])
    raw = net(x, levels)
    score = score_function(net, sigmas)(x, levels)
    assert score.shape == x.shape
    for i, lvl in enumerate(levels.tolist()):
        torch.testing.assert_close(score[i], raw[i] / sigmas[lvl])


@torch.no_grad()
def test_score_function_ncsn_is_raw():
    net = NCSN(in_channels=1, image_size=28, ngf=8, num_scales=10).eval()
    sigmas = torch.logspace(0, -2, 10)
    x = torch.rand(2, 1, 28, 28)
    levels = torch.tensor([0, 9])
    torch.testing.assert_close(score_function(net, sigmas)(x, levels), net(x, levels))


# ----------------------------------------------------------------------------- no framework imports


def test_nets_sources_do_not_import_frameworks():
    for path in NETS_DIR.glob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"


def test_importing_nets_loads_no_framework():
    # Compare sys.modules before/after importing ncsn.nets (on top of the bare ncsn package).
    code = (
        "import sys, ncsn\n"
        "before = set(sys.modules)\n"
        "import ncsn.nets\n"
        f"bad = sorted(m for m in set(sys.modules) - before if m.split('.')[0] in {FORBIDDEN!r})\n"
        "print(','.join(bad))\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC_DIR), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == ""
