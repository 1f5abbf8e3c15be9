"""Samplers: the paper's toy result (Fig. 3), step convention, callbacks, inpainting, determinism."""

import subprocess
import sys

import pytest
import torch

from ncsn.data.datasets import gmm_perturbed_score
from ncsn.errors import ConfigError
from ncsn.samplers import (
    SAMPLER_DEFAULTS,
    annealed_langevin,
    annealed_langevin_inpaint,
    build_plan,
    consistent_annealed,
    inpaint,
    langevin,
    nfe,
    predictor_corrector,
    sample,
    sampler_settings,
)
from ncsn.sigmas import geometric_sigmas

N = 2000


def mixture_score_fn(sigmas):
    def score(x, levels):
        return gmm_perturbed_score(x, sigmas[levels][:, None])

    return score


def share_in_small_mode(x):
    return (x.sum(dim=1) < 0).float().mean().item()


def uniform_init(n, seed):
    return torch.rand(n, 2, generator=torch.Generator().manual_seed(seed)) * 16 - 8


def test_annealed_langevin_recovers_the_mixture_weights_papers_toy_result():
    # Paper Fig. 3: sigma geometric 20 -> 1, L = 10, T = 100, eps = 0.1 (= 2 * step_lr), init U[-8, 8]^2.
    sigmas = geometric_sigmas(20.0, 1.0, 10)
    x = annealed_langevin(mixture_score_fn(sigmas), uniform_init(N, 0), sigmas, 100, 0.05,
                          generator=torch.Generator().manual_seed(1))
    assert share_in_small_mode(x) == pytest.approx(0.2, abs=0.03)
    # and the samples sit on the modes, not between them
    near = torch.minimum((x - 5).norm(dim=1), (x + 5).norm(dim=1))
    assert near.median().item() < 2.0


def test_plain_langevin_misses_the_weights_by_more_than_10_points():
    sigmas = torch.tensor([1e-8])  # the score of the clean mixture (no perturbation)
    x = langevin(lambda y: gmm_perturbed_score(y, sigmas), uniform_init(N, 0), 1000, 0.05,
                 generator=torch.Generator().manual_seed(1))
    assert abs(share_in_small_mode(x) - 0.2) > 0.10


def test_step_convention_is_official_x_plus_alpha_s_plus_sqrt_2alpha_z():
    sigmas = torch.tensor([2.0, 1.0])
    step_lr = 0.01
    calls = []

    def constant_score(x, levels):
        calls.append(levels.clone())
        return torch.ones_like(x)

    # with the noise fixed by the generator, reproduce the update by hand
    x0 = torch.zeros(3, 2)
    out = annealed_langevin(constant_score, x0, sigmas, 1, step_lr, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    expected = x0
    for sigma in (2.0, 1.0):
        alpha = step_lr * sigma**2 / 1.0**2
        expected = expected + alpha + (2 * alpha) ** 0.5 * torch.randn(3, 2, generator=g)
    assert torch.allclose(out, expected, atol=1e-6)
    assert [c.tolist() for c in calls] == [[0, 0, 0], [1, 1, 1]]


def test_denoise_adds_sigma_L_squared_times_score():
    sigmas = torch.tensor([1.0, 0.5])
    score = lambda x, lv: torch.full_like(x, 2.0)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    plain = annealed_langevin(score, torch.zeros(2, 2), sigmas, 3, 0.01, generator=g1)
    den = annealed_langevin(score, torch.zeros(2, 2), sigmas, 3, 0.01, generator=g2, denoise=True)
    assert torch.allclose(den - plain, torch.full((2, 2), 0.25 * 2.0))


def test_callback_sees_every_step_and_same_seed_same_samples():
    sigmas = geometric_sigmas(1.0, 0.1, 4)
    seen = []
    score = mixture_score_fn(sigmas)
    a = annealed_langevin(score, torch.zeros(5, 2), sigmas, 3, 0.01, generator=torch.Generator().manual_seed(7),
                          callback=lambda d: seen.append((d["level"], d["step"], d["x"].shape)))
    b = annealed_langevin(score, torch.zeros(5, 2), sigmas, 3, 0.01, generator=torch.Generator().manual_seed(7))
    assert [(lv, st) for lv, st, _ in seen] == [(i, t) for i in range(4) for t in range(3)]
    assert torch.equal(a, b)


@pytest.mark.parametrize("n_steps, step_lr", [(0, 0.1), (3, 0.0), (3, -1e-5)])
def test_bad_sampler_settings_raise(n_steps, step_lr):
    with pytest.raises(ConfigError):
        annealed_langevin(lambda x, lv: x, torch.zeros(1, 2), torch.tensor([1.0, 0.5]), n_steps, step_lr)


def test_inpainting_keeps_known_pixels_and_fills_the_rest_from_the_model():
    # score of N(mu, (1 + sigma^2) I) per pixel: the unknown pixels should end near mu = 0.7
    sigmas = geometric_sigmas(1.0, 0.01, 10)

    def score(x, levels):
        s = sigmas[levels].view(-1, 1, 1, 1)
        return -(x - 0.7) / (0.01 + s**2)

    known = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1.0
    out = annealed_langevin_inpaint(score, known, mask, sigmas, 50, 2e-5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out[..., :4], known[..., :4])
    assert out[..., 4:].mean().item() == pytest.approx(0.7, abs=0.05)


# ---- predictor-corrector and consistent annealed sampling beside ALD --------------------------------------

def prior_init(n, seed, sigma_1):
    """The first level's noisy data: U[-8, 8]^2 plus sigma_1 z (what pc and cas start from)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 2, generator=g) * 16 - 8 + sigma_1 * torch.randn(n, 2, generator=g)


@pytest.mark.parametrize("settings", [
    {"name": "ald", "n_steps_each": 100, "step_lr": 0.05, "denoise": False},  # paper Fig. 3: 1,000 NFE
    {"name": "pc", "n_corrector": 1, "snr": 0.16, "denoise": False},           # 200 NFE
    {"name": "cas", "n_steps_each": 1, "step_lr": 0.1, "denoise": False},      # 99 NFE, eta = 0.1
])
def test_every_sampler_recovers_the_mixture_weights(settings):
    # Paper Fig. 3 setting (sigma 20 -> 1, analytic scores). ALD uses the paper's L = 10 and T = 100; pc and cas
    # take one network evaluation per level and so get the same sigma range on L = 100 levels (on L = 10, with
    # gamma = 1.4 between levels, both discretisations are too coarse: 0.27 and 0.25 measured).
    sigmas = geometric_sigmas(20.0, 1.0, 10 if settings["name"] == "ald" else 100)
    init = uniform_init(N, 0) if settings["name"] == "ald" else prior_init(N, 0, float(sigmas[0]))
    x = sample(mixture_score_fn(sigmas), init, sigmas, settings, generator=torch.Generator().manual_seed(1))
    assert share_in_small_mode(x) == pytest.approx(0.2, abs=0.03)  # measured 0.222, 0.217, 0.202
    near = torch.minimum((x - 5).norm(dim=1), (x + 5).norm(dim=1))
    assert near.median().item() < 2.0


MU, S = 0.5, 0.2


@pytest.mark.parametrize("levels, settings, var_tol", [
    (50, {"name": "ald", "n_steps_each": 10, "step_lr": 2e-5, "denoise": False}, 0.10),  # measured +7 %
    (50, {"name": "pc", "n_corrector": 1, "denoise": True}, 0.10),                        # +3 %
    (200, {"name": "cas", "step_lr": 5e-6, "denoise": True}, 0.05),                       # -2 %
])
def test_gaussian_data_gets_the_right_mean_and_variance(levels, settings, var_tol):
    # data N(0.5, 0.2^2) in 16 dimensions: the score of its sigma-blur is -(x - mu) / (s^2 + sigma^2)
    sigmas = geometric_sigmas(5.0, 0.01, levels)

    def score(x, lv):
        return -(x - MU) / (S**2 + sigmas[lv].view(-1, 1) ** 2)

    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4000, 16, generator=g)
    if settings["name"] != "ald":
        x0 = x0 + sigmas[0] * torch.randn(x0.shape, generator=g)
    x = sample(score, x0, sigmas, settings, generator=torch.Generator().manual_seed(1))
    assert x.mean().item() == pytest.approx(MU, abs=0.01)
    assert x.var(0).mean().item() == pytest.approx(S**2, rel=var_tol)


@pytest.mark.parametrize("settings, expected", [
    ({"name": "ald", "n_steps_each": 4, "step_lr": 1e-5, "denoise": True}, 7 * 4 + 1),
    ({"name": "ald", "n_steps_each": 3, "step_lr": 1e-5, "denoise": False}, 7 * 3),
    ({"name": "pc", "n_corrector": 0}, 7),
    ({"name": "pc", "n_corrector": 2, "denoise": False}, 7 * 3),
    ({"name": "cas", "n_steps_each": 1, "step_lr": 1e-4}, 6 + 1),
    ({"name": "cas", "n_steps_each": 3, "step_lr": 1e-4, "denoise": False}, 7 * 3),  # the last level too
])
def test_nfe_is_exactly_the_network_evaluations_per_sample(settings, expected):
    sigmas = geometric_sigmas(1.0, 0.01, 7)
    evaluated = []

    def score(x, lv):
        evaluated.append(x.shape[0])
        return -x

    out = sample(score, torch.rand(5, 3), sigmas, settings)
    assert sum(evaluated) == 5 * expected and out.shape == (5, 3)
    assert build_plan(sigmas, settings).nfe == nfe(settings, 7) == expected


@pytest.mark.parametrize("name", ["ald", "pc", "cas"])
def test_same_seed_same_samples_and_every_step_reaches_the_callback(name):
    sigmas = geometric_sigmas(1.0, 0.01, 5)
    settings = {"name": name, "step_lr": 8e-5, "n_steps_each": 2}
    seen = []
    a = sample(mixture_score_fn(sigmas), torch.zeros(6, 2), sigmas, settings,
               generator=torch.Generator().manual_seed(3), callback=lambda d: seen.append((d["level"], d["step"])))
    b = sample(mixture_score_fn(sigmas), torch.zeros(6, 2), sigmas, settings,
               generator=torch.Generator().manual_seed(3))
    c = sample(mixture_score_fn(sigmas), torch.zeros(6, 2), sigmas, settings,
               generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    plan = build_plan(sigmas, settings)
    assert seen == [(i, t) for i in range(plan.num_levels) for t in range(plan.draws)]


def test_named_functions_equal_the_dispatch_and_pc_denoise_is_its_last_predictor_step():
    sigmas = geometric_sigmas(1.0, 0.01, 6)
    score = mixture_score_fn(sigmas)
    x = torch.rand(4, 2)
    run = lambda fn, *a, **k: fn(score, x, sigmas, *a, generator=torch.Generator().manual_seed(0), **k)
    assert torch.equal(run(predictor_corrector, 2, 0.2), run(sample, {"name": "pc", "n_corrector": 2, "snr": 0.2}))
    assert torch.equal(run(consistent_annealed, 2, 8e-5), run(sample, {"name": "cas", "n_steps_each": 2,
                                                                          "step_lr": 8e-5}))
    # predictor only, one level: x + sigma^2 s(x) (+ sigma z without denoising)
    one = torch.tensor([0.5])
    const = lambda y, lv: torch.ones_like(y)
    den = predictor_corrector(const, x, one, 0, denoise=True)
    torch.testing.assert_close(den, x + 0.25)
    g = torch.Generator().manual_seed(9)
    noisy = predictor_corrector(const, x, one, 0, denoise=False, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(noisy, x + 0.25 + 0.5 * torch.randn(x.shape, generator=g))


def test_cas_keeps_the_noise_level_on_the_schedule():
    # pure noise around a point mass at 0 (score -x / sigma^2): after each level the std is exactly sigma_{i+1}
    sigmas = geometric_sigmas(10.0, 0.1, 8)
    stds = []
    x = sigmas[0] * torch.randn(20000, 4, generator=torch.Generator().manual_seed(0))
    consistent_annealed(lambda y, lv: -y / sigmas[lv].view(-1, 1) ** 2, x, sigmas, 1, 0.005, denoise=False,
                        generator=torch.Generator().manual_seed(1), callback=lambda d: stds.append(d["x"].std()))
    # without the denoising step the paper's last step runs at σ_L and adds no noise: (1 − η) σ_L is left
    eta = 0.005 / float(sigmas[-1]) ** 2
    expected = torch.cat([sigmas[1:], (1 - eta) * sigmas[-1:]])
    torch.testing.assert_close(torch.stack(stds), expected, rtol=0.02, atol=0)


def test_cas_allows_the_official_range_of_eta_up_to_one_plus_the_level_ratio():
    # σ 1 → 0.01 over 10 levels: σ_{i+1}/σ_i = 0.6, so η = step_lr/σ_L² may go up to 1.6 (the official code)
    sigmas = geometric_sigmas(1.0, 0.01, 10)
    assert build_plan(sigmas, {"name": "cas", "step_lr": 1.5e-4}).nfe == 10
    with pytest.raises(ConfigError, match="step_lr <= 0.00016"):
        build_plan(sigmas, {"name": "cas", "step_lr": 1.7e-4})


@pytest.mark.parametrize("settings, words", [
    ({"name": "cas", "step_lr": 1e-7}, "step_lr >= "),        # removes less noise than the schedule drops
    ({"name": "cas", "step_lr": 1.0}, "step_lr <= "),         # more than all of it
    ({"name": "pc", "snr": 0.0}, "snr must be > 0"),
    ({"name": "pc", "n_corrector": -1}, "n_corrector must be an integer >= 0"),
    ({"name": "ddim"}, "unknown sampler 'ddim'"),
])
def test_bad_settings_for_the_new_samplers_are_one_clear_line(settings, words):
    with pytest.raises(ConfigError) as err:
        sample(lambda x, lv: -x, torch.zeros(2, 2), geometric_sigmas(1.0, 0.01, 10), settings)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_defaults_fill_in_per_sampler_and_the_config_group_matches_them():
    from pathlib import Path

    from omegaconf import OmegaConf

    assert sampler_settings(None) == {**SAMPLER_DEFAULTS["ald"], "name": "ald"}
    assert sampler_settings({"name": "pc", "snr": 0.2, "step_lr": None})["snr"] == 0.2
    conf = Path(__file__).resolve().parents[1] / "conf" / "sampler"
    for name, defaults in SAMPLER_DEFAULTS.items():
        group = OmegaConf.to_container(OmegaConf.load(conf / f"{name}.yaml"))
        assert group["name"] == name
        assert {k: group[k] for k in defaults} == defaults, name


@pytest.mark.parametrize("name", ["pc", "cas"])
def test_inpainting_works_with_every_sampler(name):
    sigmas = geometric_sigmas(1.0, 0.01, 30)

    def score(x, levels):
        s = sigmas[levels].view(-1, 1, 1, 1)
        return -(x - 0.7) / (0.01 + s**2)

    known = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1.0
    out = inpaint(score, known, mask, sigmas, {"name": name, "step_lr": 5e-5},
                  generator=torch.Generator().manual_seed(1))
    assert torch.equal(out[..., :4], known[..., :4])
    assert out[..., 4:].mean().item() == pytest.approx(0.7, abs=0.05)


def test_core_modules_import_neither_lightning_nor_hydra():
    code = (
        "import sys, ncsn.samplers, ncsn.losses, ncsn.sigmas, ncsn.nets; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'hydra')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_mlp_trained_with_dsm_recovers_the_mixture_weights_with_annealed_langevin():
    """The toy result with a learned score: ToyScoreMLP trained by DSM on mixture samples (about a minute)."""
    from ncsn.data.datasets import gmm_sample
    from ncsn.losses import dsm_loss
    from ncsn.nets import ToyScoreMLP, score_function

    torch.manual_seed(0)
    sigmas = geometric_sigmas(20.0, 1.0, 10)
    net = ToyScoreMLP(dim=2, hidden=128, num_scales=10)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    data = gmm_sample(20000, g)
    score = score_function(net, sigmas)
    for step in range(6000):
        if step == 4000:
            for group in opt.param_groups:
                group["lr"] = 2e-4
        x = data[torch.randint(0, len(data), (512,), generator=g)]
        loss = dsm_loss(score, x, sigmas, generator=g).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        samples = annealed_langevin(score, uniform_init(N, 2), sigmas, 100, 0.05, generator=g)
    assert share_in_small_mode(samples) == pytest.approx(0.2, abs=0.04)  # measured: 0.2005


# ------------------------------------------------------------------------------ sampler.num_levels (issue 31)
@pytest.mark.parametrize("settings", [{"name": "cas", "n_steps_each": 2, "step_lr": 5e-5},
                                      {"name": "ald", "n_steps_each": 1, "step_lr": 3e-5, "denoise": True},
                                      {"name": "pc", "n_corrector": 1}])
def test_num_levels_walks_a_coarser_geometric_list_exactly_as_a_model_trained_on_it_would(settings):
    from ncsn.app.module import ScoreModel
    from ncsn.nets import NCSNv2

    torch.manual_seed(0)
    net = NCSNv2(1, 8, 4)
    full = ScoreModel(net, geometric_sigmas(15.77, 0.01, 95), [1, 8, 8], sampler=settings)
    coarse = ScoreModel(net, geometric_sigmas(15.77, 0.01, 25), [1, 8, 8], sampler=settings)
    a = full.sample(3, generator=torch.Generator().manual_seed(1), num_levels=25)
    b = coarse.sample(3, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(a, b, atol=1e-5)
    plan = full.sampling_plan(full.sampling_settings(num_levels=25))
    assert plan.nfe == coarse.sampling_plan(coarse.sampler_settings).nfe
    assert plan.nfe == {"cas": 49, "ald": 26, "pc": 50}[settings["name"]]
    assert float(plan.sigma_at(24, full.sigmas)) == pytest.approx(0.01, rel=1e-5)


def test_num_levels_is_refused_for_a_level_indexed_network_in_one_line():
    from ncsn.app.module import ScoreModel
    from ncsn.nets import NCSN

    model = ScoreModel(NCSN(in_channels=1, image_size=8, ngf=4, num_scales=10), geometric_sigmas(1.0, 0.01, 10),
                       [1, 8, 8], sampler={"name": "cas", "step_lr": 5e-5})
    with pytest.raises(ConfigError, match="num_levels needs a network that takes any σ"):
        model.sampling_plan(model.sampling_settings(num_levels=5))
    with pytest.raises(ConfigError, match="num_levels must be an integer >= 2"):
        model.sampling_plan(model.sampling_settings(num_levels=1))
