"""The few-step samplers (euler, heun, dpmpp_2m, euler_ancestral, edm) against analytic scores: the right
distribution, the convergence order, exact NFE, determinism, the paper's toy weights, level snapping."""

import math

import pytest
import torch

from ncsn.data.datasets import gmm_perturbed_score
from ncsn.errors import ConfigError
from ncsn.nets import score_function
from ncsn.samplers import build_plan, initial_samples, inpaint, nfe, run_plan, sample, sampler_settings
from ncsn.sigmas import geometric_sigmas, karras_grid

FEWSTEP = ["euler", "heun", "dpmpp_2m", "euler_ancestral", "edm"]
DETERMINISTIC = ["euler", "heun", "dpmpp_2m"]
MU, S = 0.3, 0.5  # the data: N(MU, S^2 I)
SIGMAS = geometric_sigmas(10.0, 0.01, 20)


def gaussian_score(x, sigma):
    """The VE score of N(MU, S^2): -(x - MU) / (S^2 + σ^2), σ a float tensor [B] of real noise levels."""
    assert sigma.dtype.is_floating_point, "few-step samplers ask for the score at real σ"
    return -(x - MU) / (S**2 + sigma.view(-1, *([1] * (x.dim() - 1))) ** 2)


def prior_samples(n, seed=0, dim=4):
    g = torch.Generator().manual_seed(seed)
    return MU + math.sqrt(S**2 + float(SIGMAS[0]) ** 2) * torch.randn(n, dim, generator=g, dtype=torch.float64)


def exact_ode_then_denoise(x0):
    """The probability-flow ODE's exact map from σ_max to σ_min (x − μ scales with sqrt(S² + σ²)), then the
    denoising step x + σ_min² s(x, σ_min) that every sampler's last step to σ = 0 is."""
    smax, smin = float(SIGMAS[0]), float(SIGMAS[-1])
    x = MU + (x0 - MU) * math.sqrt(S**2 + smin**2) / math.sqrt(S**2 + smax**2)
    return x - smin**2 * (x - MU) / (S**2 + smin**2)


@pytest.mark.parametrize("name,steps", [("euler", 200), ("heun", 50), ("dpmpp_2m", 50)])
def test_ode_samplers_map_the_noisy_gaussian_to_the_data_distribution(name, steps):
    x0 = prior_samples(20000)
    out = sample(gaussian_score, x0, SIGMAS.double(), {"name": name, "num_steps": steps})
    assert out.mean().item() == pytest.approx(MU, abs=0.01)
    assert out.std().item() == pytest.approx(S, rel=0.02)


@pytest.mark.parametrize("name,order", [("euler", 1), ("heun", 2), ("dpmpp_2m", 2)])
def test_convergence_order_error_falls_2x_first_order_4x_second_order_per_doubling(name, order):
    x0 = prior_samples(16)
    exact = exact_ode_then_denoise(x0)
    errors = []
    for steps in (8, 16, 32):
        out = sample(gaussian_score, x0, SIGMAS.double(), {"name": name, "num_steps": steps, "rho": 7.0})
        errors.append((out - exact).abs().max().item())
    ratios = [errors[i] / errors[i + 1] for i in range(2)]
    expected = 2.0**order
    assert all(0.6 * expected < r < 1.6 * expected for r in ratios), (errors, ratios)


@pytest.mark.parametrize("name,steps", [("euler_ancestral", 200), ("edm", 50)])
def test_stochastic_samplers_reach_the_data_distribution(name, steps):
    x0 = prior_samples(20000)
    out = sample(gaussian_score, x0, SIGMAS.double(), {"name": name, "num_steps": steps},
                 generator=torch.Generator().manual_seed(3))
    assert out.mean().item() == pytest.approx(MU, abs=0.01)
    assert out.std().item() == pytest.approx(S, rel=0.03)


def test_edm_keeps_the_paper_toy_mixture_weights():
    # The paper's toy (Fig. 3): 1/5 N((-5,-5), I) + 4/5 N((5,5), I), σ from 20 down; the exact perturbed score.
    sigmas = geometric_sigmas(20.0, 0.01, 10)

    def score(x, sigma):
        return gmm_perturbed_score(x, sigma[:, None])

    settings = sampler_settings({"name": "edm", "num_steps": 30, "s_tmin": 0.0, "s_tmax": 100.0})
    x0 = initial_samples(4000, (2,), sigmas[0], settings, torch.Generator().manual_seed(0))
    out = sample(score, x0, sigmas, settings, generator=torch.Generator().manual_seed(1))
    small = (out.sum(dim=1) < 0).float().mean().item()
    assert small == pytest.approx(0.2, abs=0.03)
    near = torch.minimum((out - 5).norm(dim=1), (out + 5).norm(dim=1))
    assert near.median().item() < 1.5


@pytest.mark.parametrize("settings,expected", [
    ({"name": "euler", "num_steps": 7}, 7),
    ({"name": "heun", "num_steps": 18}, 35),
    ({"name": "dpmpp_2m", "num_steps": 20}, 20),
    ({"name": "euler_ancestral", "num_steps": 9}, 9),
    ({"name": "edm", "num_steps": 5}, 9),
    ({"name": "heun", "grid": "levels"}, 2 * 20 - 1),
    ({"name": "euler", "num_steps": 1}, 1),
    ({"name": "heun", "num_steps": 18, "corrector_steps": 3}, 38),
    ({"name": "dpmpp_2m", "num_steps": 20, "corrector_steps": 2}, 22),
])
def test_exact_network_evaluations(settings, expected):
    calls = []

    def counting(x, sigma):
        calls.append(x.shape[0])
        return gaussian_score(x, sigma)

    plan = build_plan(SIGMAS, settings)
    assert plan.nfe == expected == nfe(settings, SIGMAS.shape[0])
    run_plan(plan, counting, prior_samples(3).float(), SIGMAS, generator=torch.Generator().manual_seed(0))
    assert len(calls) == expected


@pytest.mark.parametrize("name", FEWSTEP)
def test_same_seed_same_samples(name):
    x0 = prior_samples(8).float()
    a = sample(gaussian_score, x0, SIGMAS, {"name": name, "num_steps": 6}, generator=torch.Generator().manual_seed(4))
    b = sample(gaussian_score, x0, SIGMAS, {"name": name, "num_steps": 6}, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)


class LevelNet(torch.nn.Module):
    """A level-indexed network (noise_input 'level') that records the levels it is asked for."""

    divide_by_sigma = True
    noise_input = "level"

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, levels):
        assert levels.dtype == torch.long
        self.seen.append(levels.clone())
        return -x


@pytest.mark.parametrize("name", FEWSTEP)
def test_a_level_indexed_network_only_ever_sees_trained_levels_and_steps_use_them(name):
    net = LevelNet()
    score = score_function(net, SIGMAS)
    settings = {"name": name, "num_steps": 40, "s_tmin": 0.0, "s_tmax": 100.0}
    plan = build_plan(SIGMAS, settings, score.snap)
    trained = set(SIGMAS.tolist())
    # every σ a step evaluates at (the grid, EDM's raised σ̂) is a trained level, and no step is empty
    assert set(plan.coeffs[:, 0].tolist()) <= trained
    assert set(plan.level_sigmas[:-1].tolist()) <= trained and plan.level_sigmas[-1] == 0
    assert (plan.level_sigmas[1:] < plan.level_sigmas[:-1]).all()
    run_plan(plan, score, torch.randn(2, 3), SIGMAS, generator=torch.Generator().manual_seed(0))
    assert len(net.seen) == plan.nfe < nfe(settings, SIGMAS.shape[0])  # 40 steps on 20 levels: merged


def test_a_sigma_free_network_is_evaluated_at_the_exact_sigma():
    class SigmaFree(LevelNet):
        noise_input = "none"

    score = score_function(SigmaFree(), SIGMAS)
    sigma = torch.tensor([3.3, 0.05])
    assert torch.equal(score.snap(sigma), sigma)
    x = torch.ones(2, 3)
    assert torch.allclose(score(x, sigma), -x / sigma[:, None])


def test_inpainting_with_a_few_step_sampler_keeps_the_known_pixels_and_fills_the_rest():
    known = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1
    settings = {"name": "heun", "num_steps": 12}
    x_init = initial_samples(4, (1, 8, 8), SIGMAS[0], sampler_settings(settings), torch.Generator().manual_seed(1))
    out = inpaint(gaussian_score, known, mask, SIGMAS, settings, x_init=x_init,
                  generator=torch.Generator().manual_seed(2))
    assert torch.equal(out[..., :4], known[..., :4])
    assert out[..., 4:].mean().item() == pytest.approx(MU, abs=0.1)
    assert out[..., 4:].std().item() == pytest.approx(S, rel=0.25)


def test_trajectory_callback_sees_each_step_with_its_grid_sigma():
    seen = []
    sample(gaussian_score, prior_samples(2).float(), SIGMAS, {"name": "heun", "num_steps": 5},
           callback=lambda d: seen.append(float(d["sigma"])))
    assert seen == pytest.approx(karras_grid(float(SIGMAS[0]), float(SIGMAS[-1]), 5)[:-1].tolist(), rel=1e-6)


@pytest.mark.parametrize("settings,words", [
    ({"name": "heun", "num_steps": 0}, "num_steps"),
    ({"name": "edm", "s_churn": -1.0}, "s_churn"),
    ({"name": "euler", "grid": "cosine"}, "grid"),
    ({"name": "euler", "rho": 0.0}, "rho"),
])
def test_bad_settings_are_one_clear_error(settings, words):
    with pytest.raises(ConfigError, match=words):
        build_plan(SIGMAS, settings)


def test_karras_grid_is_rho_spaced_from_sigma_max_to_sigma_min_then_zero():
    grid = karras_grid(80.0, 0.002, 18, 7.0)
    assert grid.shape == (19,) and grid[0] == 80.0 and grid[17] == pytest.approx(0.002) and grid[-1] == 0
    roots = grid[:-1] ** (1 / 7)
    assert torch.allclose(roots[1:] - roots[:-1], (roots[1] - roots[0]).expand(17), rtol=1e-9)


def test_a_final_langevin_corrector_keeps_the_data_distribution_and_the_same_seed_same_samples():
    x0 = prior_samples(20000)
    settings = {"name": "heun", "num_steps": 50, "corrector_steps": 4, "corrector_snr": 0.16}
    out = sample(gaussian_score, x0, SIGMAS.double(), settings, generator=torch.Generator().manual_seed(0))
    assert out.mean().item() == pytest.approx(MU, abs=0.01)
    assert out.std().item() == pytest.approx(S, rel=0.02)
    again = sample(gaussian_score, x0, SIGMAS.double(), settings, generator=torch.Generator().manual_seed(0))
    plain = sample(gaussian_score, x0, SIGMAS.double(), {"name": "heun", "num_steps": 50})
    assert torch.equal(out, again) and not torch.equal(out, plain)
    with pytest.raises(ConfigError, match="corrector_steps"):
        build_plan(SIGMAS, {"name": "heun", "corrector_steps": -1})
