"""NCSNv2Deeper and NCSNv2Deepest (ermongroup/ncsnv2's LSUN and FFHQ networks): the official parameter names,
shapes, order and counts, and the feature-map sizes their stages work at. CPU, fast: the full-width networks
are built on the meta device (names and shapes only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fakes import parameter_table

from ncsn.nets import NCSNv2, NCSNv2Deeper, NCSNv2Deepest, score_function

TABLE = Path(__file__).parent / "data" / "ermongroup_ncsnv2_deepest_parameters.txt"


def official_parameters(cls: type, ngf: int, channels: int) -> dict[str, tuple[int, ...]]:
    """The official class's parameters (name -> shape, registration order) from the table read off it."""
    skip = ("res31.", "refine31.") if cls is NCSNv2Deeper else ()
    return parameter_table(TABLE, ngf, channels, skip)


def meta_net(cls: type, ngf: int = 128, channels: int = 3, image_size: int = 256) -> torch.nn.Module:
    with torch.device("meta"):
        return cls(in_channels=channels, image_size=image_size, ngf=ngf)


@pytest.mark.parametrize(("cls", "count"), [(NCSNv2Deeper, 83_445_379), (NCSNv2Deepest, 94_132_611),
                                            (NCSNv2, 29_694_083)])
def test_parameter_counts_are_the_official_ones_at_ngf_128(cls, count):
    assert sum(p.numel() for p in meta_net(cls).parameters()) == count


@pytest.mark.parametrize("cls", [NCSNv2Deeper, NCSNv2Deepest])
@pytest.mark.parametrize(("ngf", "channels"), [(128, 3), (32, 1)])
def test_parameter_names_shapes_and_order_are_the_official_ones(cls, ngf, channels):
    """So an official checkpoint loads by name, and its Adam state (keyed by position) lines up."""
    net = meta_net(cls, ngf, channels)
    assert [(n, tuple(p.shape)) for n, p in net.named_parameters()] == list(
        official_parameters(cls, ngf, channels).items())
    assert not list(net.buffers())


def stage_outputs(net: NCSNv2, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """The output shape of every encoder stage (the last block of each ``res*`` list)."""
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [getattr(net, s.name)[-1].register_forward_hook(
        lambda _m, _i, out, name=s.name: shapes.__setitem__(name, tuple(out.shape))) for s in net.stages]
    try:
        with torch.no_grad():
            out = net(x, torch.zeros(x.shape[0], dtype=torch.long))
    finally:
        for hook in hooks:
            hook.remove()
    assert out.shape == x.shape and torch.isfinite(out).all()
    return shapes


def test_deeper_halves_twice_and_widens_to_4_ngf():
    net = NCSNv2Deeper(in_channels=3, image_size=32, ngf=4).eval()
    shapes = stage_outputs(net, torch.rand(2, 3, 32, 32))
    assert shapes == {"res1": (2, 4, 32, 32), "res2": (2, 8, 16, 16), "res3": (2, 8, 8, 8),
                      "res4": (2, 16, 8, 8), "res5": (2, 16, 8, 8)}


def test_deepest_halves_three_times():
    net = NCSNv2Deepest(in_channels=1, image_size=32, ngf=4).eval()
    shapes = stage_outputs(net, torch.rand(2, 1, 32, 32))
    assert shapes == {"res1": (2, 4, 32, 32), "res2": (2, 8, 16, 16), "res3": (2, 8, 8, 8),
                      "res31": (2, 8, 4, 4), "res4": (2, 16, 4, 4), "res5": (2, 16, 4, 4)}


@pytest.mark.parametrize("cls", [NCSNv2Deeper, NCSNv2Deepest])
def test_every_parameter_is_used_and_the_score_is_output_over_sigma(cls):
    torch.manual_seed(0)
    net = cls(in_channels=3, image_size=16, ngf=4)
    x = torch.rand(2, 3, 16, 16)
    net(x, torch.tensor([0, 3])).square().mean().backward()
    assert [n for n, p in net.named_parameters() if p.grad is None] == []
    net.eval()
    sigmas = torch.tensor([4.0, 2.0, 1.0, 0.5])
    levels = torch.tensor([0, 3])
    with torch.no_grad():
        raw = net(x, levels)
        torch.testing.assert_close(net(x, torch.tensor([1, 2])), raw)  # unconditional: levels are ignored
        score = score_function(net, sigmas)(x, levels)
    torch.testing.assert_close(score, raw / sigmas[levels].view(-1, 1, 1, 1))


@pytest.mark.parametrize("cls, size", [(NCSNv2Deeper, 64), (NCSNv2Deepest, 64)])
@pytest.mark.parametrize("sampler", ["edm", "heun"])
def test_the_few_step_samplers_run_on_the_deeper_networks(cls, size, sampler):
    # issue 34 (4): the few-step samplers at these networks' sizes (tiny width: shapes and finiteness, not quality)
    from ncsn.app.module import ScoreModel
    from ncsn.sigmas import geometric_sigmas

    torch.manual_seed(0)
    model = ScoreModel(cls(in_channels=3, image_size=size, ngf=4), geometric_sigmas(140.0, 0.01, 20), [3, size, size])
    out = model.sample(2, generator=torch.Generator().manual_seed(0), name=sampler, num_steps=3)
    assert out.shape == (2, 3, size, size) and torch.isfinite(out).all()
