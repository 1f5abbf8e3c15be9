import ast
import functools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ncsn.sigmas
from ncsn.errors import ConfigError
from ncsn.sigmas import (
    SIGMA_BIN_EDGES,
    explicit_sigmas,
    geometric_sigmas,
    largest_pairwise_distance,
    linear_sigmas,
    num_scales_for_ratio,
    sigma_bin_key,
    sigma_bin_low,
    suggest_schedule,
    technique2_ratio,
    technique2_value,
    technique4_step_lr,
    technique4_value,
)


def test_geometric_is_the_papers_schedule():
    s = geometric_sigmas(1.0, 0.01, 10)
    assert s.dtype == torch.float32 and s.shape == (10,)
    assert s[0].item() == pytest.approx(1.0) and s[-1].item() == pytest.approx(0.01)
    ratios = s[:-1] / s[1:]
    assert torch.allclose(ratios, torch.full_like(ratios, 100 ** (1 / 9)), rtol=1e-5)


def test_linear_schedule_is_evenly_spaced():
    s = linear_sigmas(1.0, 0.1, 4)
    assert torch.allclose(s, torch.tensor([1.0, 0.7, 0.4, 0.1]))


@pytest.mark.parametrize(
    "args, fragment",
    [((0.01, 1.0, 10), "larger than"), ((1.0, 0.0, 10), "> 0"), ((1.0, 0.01, 1), ">= 2"), ((1.0, -1, 5), "> 0")],
)
def test_bad_schedules_raise_one_clear_line(args, fragment):
    with pytest.raises(ConfigError, match=fragment) as err:
        geometric_sigmas(*args)
    assert "\n" not in str(err.value)


def test_explicit_list_must_decrease():
    with pytest.raises(ConfigError, match="strictly decreasing"):
        explicit_sigmas([1.0, 0.5, 0.5])
    assert explicit_sigmas([2.0, 1.0]).tolist() == [2.0, 1.0]


def test_largest_pairwise_distance_matches_brute_force_across_chunks():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 3, 4, 4, generator=g)
    brute = torch.cdist(x.flatten(1).double(), x.flatten(1).double()).max().item()
    assert largest_pairwise_distance(x, chunk_size=7) == pytest.approx(brute, rel=1e-9)


def test_technique2_at_official_cifar10_schedule_is_0567():
    # Official NCSNv2 CIFAR-10: sigma 50 -> 0.01, L = 232, D = 3072. The paper aims at 0.5; the
    # official schedule evaluates to about 0.567.
    gamma = (50 / 0.01) ** (1 / 231)
    assert technique2_value(gamma, 3072) == pytest.approx(0.567, abs=0.002)


def test_technique2_ratio_solves_for_target_and_gives_levels():
    gamma = technique2_ratio(3072, 0.5)
    assert technique2_value(gamma, 3072) == pytest.approx(0.5, abs=1e-9)
    assert gamma > (50 / 0.01) ** (1 / 231)  # 0.5 needs a slightly larger ratio than the official 0.567
    L = num_scales_for_ratio(50, 0.01, gamma)
    assert (50 / 0.01) ** (1 / (L - 1)) <= gamma < (50 / 0.01) ** (1 / (L - 2))


@pytest.mark.parametrize(
    "sigma_max, num_scales, official",
    [(50.0, 232, 6.2e-6), (90.0, 500, 3.3e-6)],  # CIFAR-10 and CelebA 64 configs of NCSNv2, T = 5
)
def test_technique4_reproduces_official_step_sizes(sigma_max, num_scales, official):
    gamma = (sigma_max / 0.01) ** (1 / (num_scales - 1))
    eps = technique4_step_lr(0.01, gamma, 5)
    expected = {232: 6.18e-6, 500: 3.34e-6}[num_scales]
    assert eps == pytest.approx(expected, rel=0.01)
    assert eps == pytest.approx(official, rel=0.02)
    # it is the minimiser: nudging it either way moves the quantity away from 1
    best = abs(technique4_value(eps, 0.01, gamma, 5) - 1)
    for factor in (0.9, 1.1):
        assert abs(technique4_value(eps * factor, 0.01, gamma, 5) - 1) > best


def test_suggest_schedule_from_data_prints_overrides():
    g = torch.Generator().manual_seed(1)
    data = torch.rand(64, 1, 8, 8, generator=g)
    s = suggest_schedule(data, n_steps_each=5)
    assert s.sigma_max == pytest.approx(largest_pairwise_distance(data))
    assert s.num_scales >= 2 and s.ratio > 1 and 0 < s.step_lr < 0.01**2
    assert math.isclose(s.technique2, technique2_value(s.ratio, 64))
    o = s.overrides()
    assert f"sigmas.num_scales={s.num_scales}" in o and "sampler.step_lr=" in o


# ------------------------------------------------------------------------------------------------ the CLI

def _imports(path: Path) -> tuple[set[str], set[str]]:
    """The modules ``path`` imports at module level, and anywhere (in functions, ``if __name__`` blocks...)."""
    tree = ast.parse(path.read_text())

    def names(nodes) -> set[str]:
        found = set()
        for node in nodes:
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
        return found

    return names(tree.body), names(ast.walk(tree))


def test_sigmas_and_its_command_line_do_not_import_each_other():
    src = Path(ncsn.sigmas.__file__).parent
    _, sigmas_anywhere = _imports(src / "sigmas.py")
    cli_top, _ = _imports(src / "tools" / "sigma_helper.py")
    assert not any(name.startswith("ncsn.tools.sigma_helper") for name in sigmas_anywhere)  # it runs the CLI, by runpy
    assert "ncsn.sigmas" not in cli_top  # the CLI imports the schedules only when it computes one
    code = ("import sys, ncsn.{}; "
            "print(sorted(m for m in sys.modules if m in ('ncsn.sigmas', 'ncsn.tools.sigma_helper')))")
    for module, loaded in (("sigmas", "['ncsn.sigmas']"), ("tools.sigma_helper", "['ncsn.tools.sigma_helper']")):
        out = subprocess.run([sys.executable, "-c", code.format(module)], capture_output=True, text=True,
                             check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout.strip()
        assert out == loaded


def test_python_m_ncsn_sigmas_suggest_still_works(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = functools.partial(subprocess.run, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600,
                            check=False)
    ok = run([sys.executable, "-W", "error::RuntimeWarning", "-m", "ncsn.sigmas", "suggest", "data=mnist_bundled",
              "steps_each=5"])
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "over 4500 of 4500 training points" in ok.stdout and "L (num_scales)" in ok.stdout
    last = ok.stdout.strip().splitlines()[-1]
    assert last.startswith("sigmas=geometric sigmas.sigma_max=") and "sampler.n_steps_each=5" in last
    bad = run([sys.executable, "-m", "ncsn.sigmas", "suggest", "data=imagenet"])
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown data 'imagenet'"), bad.stderr


def test_sigma_bin_keys_sort_as_text_in_the_order_of_sigma():
    """W&B sorts panels by key text: the bins must read 0.5-1, 1-2, 2-5, 10-20 in that order (not 1-2, 10-20,
    2-5)."""
    sigmas = geometric_sigmas(2000.0, 0.0001, 300).tolist()
    keys = sorted({sigma_bin_key(s) for s in sigmas})
    assert len(keys) == len(SIGMA_BIN_EDGES) + 1  # every bin, the two open-ended ones included
    assert keys == sorted(keys, key=sigma_bin_low)
    assert keys[0] == "val/loss_sigma_bin/0000.000-0000.001" and keys[-1] == "val/loss_sigma_bin/1000.000-inf"
    assert sigma_bin_key(1.5) == "val/loss_sigma_bin/0001.000-0002.000"
    assert sigma_bin_key(torch.tensor(0.01).item()) == "val/loss_sigma_bin/0000.010-0000.020"  # float32 0.01
    assert [sigma_bin_low(k) for k in keys[:3]] == [0.0, 0.001, 0.002]


def test_the_command_line_block_is_the_end_of_the_module():
    """Nothing is defined after ``if __name__ == "__main__"`` (a reader stops there)."""
    tree = ast.parse(Path(ncsn.sigmas.__file__).read_text())
    last = tree.body[-1]
    assert isinstance(last, ast.If) and ast.unparse(last.test) == "__name__ == '__main__'"
    assert sum(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) for node in tree.body) == 1
