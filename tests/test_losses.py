import pytest
import torch

from ncsn.losses import dsm_loss, sliced_score_matching_loss
from ncsn.sigmas import geometric_sigmas

D = 8


def optimal_score_fn(sigmas):
    """For data x ~ N(0, I) the perturbed density is N(0, (1 + sigma^2) I): score -x / (1 + sigma^2)."""

    def score(x, levels):
        s = sigmas[levels].view(-1, 1)
        return -x / (1 + s**2)

    return score


def test_dsm_at_the_analytic_optimum_equals_d_over_2_1_plus_sigma2():
    sigmas = geometric_sigmas(2.0, 0.1, 5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100_000, D, generator=g)
    out = dsm_loss(optimal_score_fn(sigmas), x, sigmas, generator=g)
    expected = D / (2 * (1 + sigmas**2))
    assert torch.allclose(out.per_level_mean(), expected, rtol=0.03)
    assert out.level_count.sum().item() == x.shape[0]
    # the batch loss is the count-weighted mean of the per-level losses
    assert out.loss.item() == pytest.approx((out.level_sum.sum() / out.level_count.sum()).item(), rel=1e-5)


def test_dsm_is_minimised_by_the_true_score():
    sigmas = geometric_sigmas(2.0, 0.1, 5)
    x = torch.randn(50_000, D, generator=torch.Generator().manual_seed(1))
    opt = optimal_score_fn(sigmas)
    best = dsm_loss(opt, x, sigmas, generator=torch.Generator().manual_seed(2)).loss
    for scale in (0.8, 1.2):
        worse = dsm_loss(lambda y, lv, s=scale: s * opt(y, lv), x, sigmas, generator=torch.Generator().manual_seed(2))
        assert worse.loss > best + 0.02  # same noise draws: a precise comparison


def test_dsm_weighting_power_and_explicit_levels():
    sigmas = torch.tensor([1.0, 0.5])
    x = torch.zeros(4, 3)
    z = torch.ones(4, 3)
    levels = torch.tensor([0, 1, 1, 1])
    zero = lambda y, lv: torch.zeros_like(y)
    # score 0: per-sample loss = 0.5 * sigma^p * |z/sigma|^2 = 0.5 * 3 * sigma^(p-2)
    out = dsm_loss(zero, x, sigmas, levels, noise=z, weight_power=2.0)
    assert torch.allclose(out.per_level_mean(), torch.tensor([1.5, 1.5]))
    out0 = dsm_loss(zero, x, sigmas, levels, noise=z, weight_power=0.0)
    assert torch.allclose(out0.per_level_mean(), torch.tensor([1.5, 6.0]))
    assert out0.level_count.tolist() == [1.0, 3.0]


def test_dsm_gradients_flow_to_the_network():
    net = torch.nn.Linear(D, D)
    sigmas = geometric_sigmas(1.0, 0.1, 3)
    out = dsm_loss(lambda y, lv: net(y), torch.randn(16, D), sigmas)
    out.loss.backward()
    assert net.weight.grad is not None and net.weight.grad.abs().sum() > 0


def test_sliced_score_matching_prefers_the_true_score():
    sigmas = geometric_sigmas(2.0, 0.1, 3)
    x = torch.randn(20_000, 2, generator=torch.Generator().manual_seed(3))
    opt = optimal_score_fn(sigmas)
    best = sliced_score_matching_loss(opt, x, sigmas, generator=torch.Generator().manual_seed(4))
    # SSM equals the score-matching objective up to a constant: E[½|s|² + tr ∇s]; at the optimum
    # per level that is -D/(2(1+σ²)) times σ² weighting.
    expected = -2 / (2 * (1 + sigmas**2)) * sigmas**2
    assert torch.allclose(best.per_level_mean(), expected, atol=0.03)
    worse = sliced_score_matching_loss(
        lambda y, lv: 0.5 * opt(y, lv), x, sigmas, generator=torch.Generator().manual_seed(4)
    )
    assert worse.loss > best.loss
