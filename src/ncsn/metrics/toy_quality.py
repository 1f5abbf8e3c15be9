"""The sample-quality metric of the 2-D toy mixture (``data=toy_gmm``), against the known mixture
(``ncsn.data.datasets``: ``GMM_WEIGHTS``, ``GMM_MEANS``, ``gmm_sample``; nothing is restated here)."""

from __future__ import annotations

import math

import numpy as np
import torch

from ncsn.errors import ConfigError
from ncsn.metrics.base import SampleQuality
from ncsn.metrics.distances import check_count, energy_distance, mean_pair_distance
from ncsn.metrics.registry import PRIMARY_KEYS

__all__ = ["ToyMixtureQuality"]

ENERGY_REFERENCE = 5000  # reference points of the energy distance (the first of the fixed reference sample)


class ToyMixtureQuality(SampleQuality):
    """2-D points against a fixed sample of the true mixture (``num_reference`` points, seed ``seed``).

    * ``quality/energy_distance`` (primary): the unbiased energy distance (``distances.energy_distance``) to the
      first ``ENERGY_REFERENCE`` reference points: 0 in
      expectation for samples of the true mixture at any N (it can dip slightly below 0), so values mean the same
      at any sample count;
    * ``quality/sliced_wasserstein``: sliced 1-Wasserstein distance, averaged over ``num_projections`` evenly
      spaced directions (each 1-D W1 compares the samples' sorted projections with the reference's quantiles at
      the same levels). Biased upward at small N (about 1/√N for samples of the true mixture), so it is only
      comparable at the same N;
    * ``quality/mode_weight_error``: each sample is assigned to the nearest mode centre; the largest
      |estimated weight − true weight| over the modes (with two modes: the error on the 0.2 mode).

    Non-finite coordinates count as far-away points (±1e3), so a diverged sampler scores badly, not NaN.
    """

    name = PRIMARY_KEYS["toy"]
    description = (
        "toy mixture: energy distance to the true 2-D mixture (unbiased at any N, 0 = the true law; lower is "
        "better); sliced_wasserstein (biased at small N) and mode_weight_error = |estimated - true| mode weight"
    )
    keys = ("quality/energy_distance", "quality/sliced_wasserstein", "quality/mode_weight_error")

    def __init__(
        self,
        num_samples: int = 1000,
        *,
        num_reference: int = 20000,
        num_projections: int = 64,
        seed: int = 0,
        device: str | torch.device | None = None,
    ) -> None:
        from ncsn.data.datasets import GMM_MEANS, GMM_WEIGHTS, gmm_sample

        if int(num_samples) < 2:
            raise ConfigError(f"quality num_samples must be >= 2, got {num_samples}")
        self.num_samples = int(num_samples)
        self.means = GMM_MEANS.double()
        # float32 -> the decimals they were written as (0.2, not 0.20000000298)
        self.weights = torch.tensor([float(f"{w:.7g}") for w in GMM_WEIGHTS.tolist()], dtype=torch.float64)
        angles = torch.arange(num_projections, dtype=torch.float64) * (math.pi / num_projections)
        self.directions = torch.stack([angles.cos(), angles.sin()], dim=1)  # [K, 2]
        self.reference = gmm_sample(int(num_reference), torch.Generator().manual_seed(seed)).double()
        self.reference_sorted = (self.reference @ self.directions.T).sort(dim=0).values  # [M, K]
        self._self_distance: float | None = None  # E|Y - Y'| of the reference, computed at the first call

    def _points(self, samples: torch.Tensor) -> torch.Tensor:
        x = samples if torch.is_tensor(samples) else torch.as_tensor(np.asarray(samples))
        if x.ndim != 2 or x.shape[1] != 2:
            raise ValueError(f"the toy mixture metric takes 2-D points [N, 2], got shape {tuple(x.shape)}")
        x = x.detach().cpu().double()
        return torch.nan_to_num(x, nan=1e3, posinf=1e3, neginf=-1e3).clamp(-1e3, 1e3)

    def sliced_wasserstein(self, x: torch.Tensor) -> float:
        proj = (x @ self.directions.T).sort(dim=0).values  # [N, K]
        n, m = proj.shape[0], self.reference_sorted.shape[0]
        levels = ((torch.arange(n, dtype=torch.float64) + 0.5) / n * m).long().clamp(max=m - 1)
        return float((proj - self.reference_sorted[levels]).abs().mean())

    def energy_distance(self, x: torch.Tensor) -> float:
        reference = self.reference[:ENERGY_REFERENCE]
        if self._self_distance is None:
            self._self_distance = mean_pair_distance(reference)
        return energy_distance(x, reference, y_self=self._self_distance)

    def __call__(self, samples: torch.Tensor) -> dict[str, float]:
        check_count(samples)
        x = self._points(samples)
        nearest = torch.cdist(x, self.means).argmin(dim=1)
        shares = torch.bincount(nearest, minlength=len(self.weights)).double() / len(x)
        return {
            "quality/energy_distance": self.energy_distance(x),
            "quality/sliced_wasserstein": self.sliced_wasserstein(x),
            "quality/mode_weight_error": float((shares - self.weights).abs().max()),
        }
