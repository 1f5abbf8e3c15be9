"""Telling the network σ (NCSNv2 with a σ embedding) and drawing σ continuously in training: the options the
few-step samplers' ODE needs (issue 31)."""

import math

import pytest
import torch

from ncsn.app.module import ScoreModel
from ncsn.errors import ConfigError
from ncsn.losses import dsm_loss
from ncsn.nets import NCSN, NCSNv2, score_function
from ncsn.sigmas import geometric_sigmas

SIGMAS = geometric_sigmas(15.77, 0.01, 95)


def test_sigma_embedding_is_an_add_on_that_starts_as_the_official_network():
    torch.manual_seed(0)
    plain = NCSNv2(1, 28, 8)
    told = NCSNv2(1, 28, 8, sigma_embedding=True)
    assert plain.noise_input == "none" and told.noise_input == "sigma"
    # the official network's parameters are untouched (same names and shapes), the embedding adds 23,016
    assert sum(p.numel() for p in plain.parameters()) == 117_033
    assert sum(p.numel() for p in told.parameters()) == 140_049
    shared = plain.state_dict()
    assert all(told.state_dict()[k].shape == v.shape for k, v in shared.items())
    told.load_state_dict({**told.state_dict(), **shared})
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(told(x, torch.tensor([10.0, 1.0, 0.01])), plain(x))  # zero-initialised conditioning


def test_a_trained_sigma_embedding_changes_the_output_with_sigma_through_the_score_adapter():
    torch.manual_seed(0)
    net = NCSNv2(1, 28, 8, sigma_embedding=True)
    for module in net.modules():
        if hasattr(module, "film"):
            torch.nn.init.normal_(module.film.weight, std=0.1)
    score = score_function(net, SIGMAS)
    x = torch.rand(1, 1, 28, 28).expand(2, -1, -1, -1)
    out = net(x, torch.tensor([5.0, 0.05]))
    assert not torch.allclose(out[0], out[1])
    # level indices and the same σ as floats give the same score (the adapter looks the σ up)
    levels = torch.tensor([0, 94])
    assert torch.allclose(score(x, levels), score(x, SIGMAS[levels]))


def test_continuous_sigma_draws_are_log_uniform_between_sigma_L_and_sigma_1():
    seen = []

    def score(x, sigma):
        seen.append(sigma)
        return torch.zeros_like(x)

    x = torch.zeros(20000, 2)
    out = dsm_loss(score, x, SIGMAS, continuous=True, generator=torch.Generator().manual_seed(0))
    sigma = seen[0]
    assert sigma.dtype.is_floating_point and sigma.shape == (20000,)
    assert sigma.min() >= SIGMAS[-1] * (1 - 1e-6) and sigma.max() <= SIGMAS[0] * (1 + 1e-6)
    logs = sigma.log()
    lo, hi = math.log(float(SIGMAS[-1])), math.log(float(SIGMAS[0]))
    assert logs.mean().item() == pytest.approx((lo + hi) / 2, abs=0.05)
    assert logs.std().item() == pytest.approx((hi - lo) / math.sqrt(12), rel=0.02)
    # a zero score costs D/2 per sample at any σ (λ = σ²), and every sample is filed under one level
    assert out.loss.item() == pytest.approx(1.0, rel=0.03)
    assert out.level_count.sum().item() == 20000 and (out.level_count > 0).sum().item() > 90


def test_continuous_draws_need_a_network_that_is_not_level_indexed():
    net = NCSN(in_channels=1, image_size=8, ngf=4, num_scales=95)
    with pytest.raises(ConfigError, match="log_uniform"):
        ScoreModel(net, SIGMAS, [1, 8, 8], sigma_draw="log_uniform")
    with pytest.raises(ConfigError, match="sigma_draw"):
        ScoreModel(NCSNv2(1, 8, 4), SIGMAS, [1, 8, 8], sigma_draw="cosine")


def test_a_sigma_conditioned_model_trains_a_step_and_samples_with_every_few_step_sampler():
    torch.manual_seed(0)
    model = ScoreModel(NCSNv2(1, 8, 4, sigma_embedding=True), SIGMAS, [1, 8, 8], sigma_draw="log_uniform",
                       optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))
    opt = model.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    loss = model.compute_loss(torch.rand(4, 1, 8, 8)).loss
    loss.backward()
    opt.step()
    for name in ("euler", "heun", "dpmpp_2m", "euler_ancestral", "edm"):
        out = model.sample(3, generator=torch.Generator().manual_seed(0), name=name, num_steps=4)
        assert out.shape == (3, 1, 8, 8) and torch.isfinite(out).all()


def test_switching_sampler_starts_from_that_samplers_defaults():
    # issue 32 (6): a paper-recipe model (ald, denoise false) asked for pc runs pc's own defaults (denoise true)
    model = ScoreModel(NCSNv2(1, 8, 4), SIGMAS, [1, 8, 8],
                       sampler={"name": "ald", "n_steps_each": 100, "step_lr": 2e-5, "denoise": False,
                                "init_low": 0.1, "init_high": 0.9})
    pc = model.sampling_settings(name="pc")
    assert pc["denoise"] is True and "step_lr" not in pc and pc["init_low"] == 0.1
    assert model.sampling_settings(n_steps_each=3)["denoise"] is False  # same sampler: its settings stay
    assert model.sampling_settings(name="pc", denoise=False)["denoise"] is False  # explicit overrides apply


def test_train_py_trains_a_sigma_conditioned_network_and_its_grid_uses_the_few_step_sampler(tmp_path):
    from conftest import run_entry

    run = tmp_path / "run"
    result = run_entry("train.py", "experiment=cpu", "debug=smoke", "logger=csv", "model.net.sigma_embedding=true",
                       "model.sigma_draw=log_uniform", "sampler=heun", "sampler.num_steps=3", f"hydra.run.dir={run}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "heun (num_steps=3" in result.stdout + result.stderr
    assert "5 network evaluations each" in result.stdout + result.stderr  # 2 · 3 − 1
    assert sorted(p.name for p in (run / "samples").glob("*.png"))
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["ncsn_config"]["sampler"]["name"] == "heun"
    assert any(k.endswith("film.weight") for k in ckpt["state_dict"])


# ------------------------------------------------------------------------------ EDM's preconditioning (issue 31)
def _zero_body(net):
    torch.nn.init.zeros_(net.end_conv.weight)
    torch.nn.init.zeros_(net.end_conv.bias)
    return net


def test_edm_preconditioning_adds_no_parameters_and_with_a_zero_body_is_the_exact_score_of_a_gaussian():
    torch.manual_seed(0)
    net = NCSNv2(1, 28, 8, sigma_embedding=True, precondition="edm", sigma_data=0.4)
    assert sum(p.numel() for p in net.parameters()) == 140_049
    # F ≡ 0 leaves D = c_skip·y: the posterior mean of y ~ N(0, σ_d² I) given y + σ z, so the score is exactly
    # that of N(0.5, (σ_d² + σ²) I), -(x - 0.5)/(σ_d² + σ²), at every σ
    _zero_body(net)
    score = score_function(net, SIGMAS)
    x = torch.randn(4, 1, 28, 28) * 3
    sigma = torch.tensor([15.0, 1.0, 0.1, 0.01])
    expected = -(x - 0.5) / (0.4**2 + sigma.view(-1, 1, 1, 1) ** 2)
    assert torch.allclose(score(x, sigma), expected, rtol=1e-5, atol=1e-6)


def test_edm_preconditioning_scales_the_body_by_c_out_and_feeds_it_c_in_times_the_centred_input():
    torch.manual_seed(0)
    net = NCSNv2(1, 8, 4, sigma_embedding=True, precondition="edm", sigma_data=0.5)
    x, sigma = torch.rand(2, 1, 8, 8), torch.tensor([3.0, 0.05])
    s, var = sigma.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1) ** 2 + 0.25
    body = net._body((x - 0.5) / var.sqrt(), sigma)
    d = 0.25 / var * (x - 0.5) + s * 0.5 / var.sqrt() * body + 0.5  # EDM's D, back in the [0, 1] range
    assert torch.allclose(net(x, sigma), (d - x) / s, atol=1e-5)


def test_edm_preconditioning_needs_the_sigma_embedding_and_a_known_name():
    with pytest.raises(ConfigError, match="sigma_embedding=true"):
        NCSNv2(1, 8, 4, precondition="edm")
    with pytest.raises(ConfigError, match="choose one of none, edm"):
        NCSNv2(1, 8, 4, sigma_embedding=True, precondition="vp")
    with pytest.raises(ConfigError, match="sigma_data"):
        NCSNv2(1, 8, 4, sigma_embedding=True, precondition="edm", sigma_data=0)


def test_edm_loss_weight_multiplies_the_papers_by_sigma_squared_plus_sigma_data_squared_over_sigma_data_squared():
    x = torch.rand(6, 1, 4, 4)
    levels = torch.tensor([0, 10, 40, 60, 80, 94])
    noise = torch.randn_like(x)

    def score(x, levels):
        return torch.full_like(x, 0.3)

    plain = dsm_loss(score, x, SIGMAS, levels, noise=noise)
    edm = dsm_loss(score, x, SIGMAS, levels, noise=noise, precondition=(0.5, 0.5))
    factor = (SIGMAS[levels] ** 2 + 0.25) / 0.25
    ratio = edm.level_sum[levels] / plain.level_sum[levels]
    assert torch.allclose(ratio, factor, rtol=1e-5)


def test_log_normal_sigma_draws_follow_edms_distribution_clamped_to_the_schedule():
    seen = []

    def score(x, sigma):
        seen.append(sigma)
        return torch.zeros_like(x)

    dsm_loss(score, torch.zeros(40000, 2), SIGMAS, log_normal=(-1.9, 1.2), generator=torch.Generator().manual_seed(0))
    logs = seen[0].log()
    assert logs.median().item() == pytest.approx(-1.9, abs=0.03)
    assert logs.min().item() >= math.log(0.01) - 1e-5 and logs.max().item() <= math.log(15.77) + 1e-5
    inside = logs[(logs > math.log(0.01) + 1e-4) & (logs < math.log(15.77) - 1e-4)]
    assert ((inside > -3.1) & (inside < -0.7)).float().mean().item() == pytest.approx(0.683, abs=0.02)  # ±1 std
    # ln 0.01 = -4.6 is 2.25 std below the mean: about 1.2 % land on σ_L
    assert (logs <= math.log(0.01) + 1e-4).float().mean().item() == pytest.approx(0.0122, abs=0.003)


def test_a_preconditioned_model_trains_on_log_normal_sigma_with_edms_weight_and_refuses_bad_settings():
    torch.manual_seed(0)
    net = NCSNv2(1, 8, 4, sigma_embedding=True, precondition="edm")
    model = ScoreModel(net, SIGMAS, [1, 8, 8], sigma_draw="log_normal", sigma_log_normal=[-1.5, 1.0],
                       optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))
    assert model._loss_weight() == {"precondition": (0.5, 0.5)}
    loss = model.compute_loss(torch.rand(4, 1, 8, 8), generator=torch.Generator().manual_seed(0)).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in net.end_conv.parameters())
    assert ScoreModel(NCSNv2(1, 8, 4), SIGMAS, [1, 8, 8])._loss_weight() == {}
    with pytest.raises(ConfigError, match="sigma_log_normal"):
        ScoreModel(NCSNv2(1, 8, 4), SIGMAS, [1, 8, 8], sigma_draw="log_normal", sigma_log_normal=[-1.9, 0])
    with pytest.raises(ConfigError, match="log_normal needs"):
        ScoreModel(NCSN(in_channels=1, image_size=8, ngf=4, num_scales=95), SIGMAS, [1, 8, 8], sigma_draw="log_normal")


def test_a_preconditioned_network_whose_body_outputs_zero_is_what_the_collapse_references_measure():
    # with EDM's preconditioning a collapsed body leaves the skip path (the score of a Gaussian), not a zero score:
    # the collapse metrics compare with that network, so it reads output_ms 0 and loss / zero-output loss 1
    torch.manual_seed(0)
    net = _zero_body(NCSNv2(1, 8, 4, sigma_embedding=True, precondition="edm"))
    model = ScoreModel(net, SIGMAS, [1, 8, 8], sigma_draw="log_uniform")
    out = model.compute_loss(torch.rand(16, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    assert out.output_sq_sum.item() < 1e-10
    assert out.level_sum.sum().item() == pytest.approx(out.zero_output_sum.item(), rel=1e-5)
    # a body that does something is seen
    torch.nn.init.normal_(net.end_conv.weight, std=0.1)
    out = model.compute_loss(torch.rand(16, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    assert out.output_sq_sum.item() > 1e-4
