"""The sample-quality metric of 28x28 grey digits (``data=mnist_bundled`` and ``data=mnist``): the shipped digit
classifier's features (``ncsn.metrics.digits``) against held-out real digits.

Reference (never in the run's training split): with the bundled digits the first
``ncsn.metrics.quality.BUNDLED_REFERENCE`` (500) of the run's held-out digits (500 by default;
``data.val_size < 500`` gives fewer, said in one warning line), with ``data=mnist`` the MNIST test set (t10k
files, 10,000 digits: ``quality_metric_for`` passes them all).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ncsn.devices import pick_device
from ncsn.errors import ConfigError
from ncsn.metrics import digits
from ncsn.metrics.base import SampleQuality
from ncsn.metrics.distances import (
    KernelReference,
    check_count,
    frechet_distance,
    gaussian_stats,
    kernel_distance,
)
from ncsn.metrics.images import image01
from ncsn.metrics.registry import PRIMARY_KEYS

__all__ = ["DigitQuality", "class_shares", "degenerate_mask"]

# degenerate-sample rule, calibrated on the 5,000 real bundled digits (none is flagged: their pixel std is
# >= 0.148, their mean and their share of pixels above 0.5 are <= 0.31); uniform noise and grey blobs are.
DEGENERATE_STD_MIN = 0.10
DEGENERATE_MEAN_MAX = 0.35
DEGENERATE_BRIGHT_SHARE_MAX = 0.35  # share of pixels above 0.5
FLOOR_SEED = 0


def degenerate_mask(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """True for each degenerate image (uint8 in [0, 255] or float in [0, 1]; [N, ...]): pixel std < 0.10
    (near-constant: blank or flat grey), or mean > 0.35, or more than 35 % of the pixels above 0.5."""
    x = image01(images).cpu().double().reshape(len(images), -1).numpy()
    return (
        (x.std(1) < DEGENERATE_STD_MIN)
        | (x.mean(1) > DEGENERATE_MEAN_MAX)
        | ((x > 0.5).mean(1) > DEGENERATE_BRIGHT_SHARE_MAX)
    )


def class_shares(labels: np.ndarray | torch.Tensor) -> np.ndarray:
    """The share of each class 0-9 among ``labels`` ([10] float64; NaN when there are no labels)."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if labels.size == 0:
        return np.full(10, np.nan)
    return np.bincount(labels, minlength=10)[:10] / labels.size


class DigitQuality(SampleQuality):
    """28x28 grey digits, scored in the shipped classifier's 128-d features against held-out real digits.

    * ``quality/kid`` (primary): the kernel distance (unbiased MMD², cubic polynomial kernel,
      ``distances.kernel_distance``) to the reference digits, in the classifier's raw feature units (no
      scaling). Its expectation is the same at any N; ``quality/kid_std`` is its standard error (jackknife over
      the samples, the reference set held fixed: the error bar between runs scored against the same reference).
      Real digits score 0 up to that noise; ``quality/kid_floor`` is N real training digits' value (the floor).
    * ``quality/fd``: Fréchet distance of Gaussians fitted to the same features (an MNIST "FID"); it shrinks with
      N, so ``quality/fd_floor`` (N real training digits, a fixed random subset) and ``quality/fd_ratio`` = fd /
      floor are only comparable at the same N;
    * ``quality/degenerate``: share of degenerate samples (``degenerate_mask``; no real digit is flagged);
    * ``quality/class_share_min`` / ``max`` / ``max_dev``: the predicted-class shares among the NON-degenerate
      samples, and the largest |share − 0.1| (0.9, its worst value, when every sample is degenerate).

    ``reference`` / ``train_images``: uint8 digits [N, 28, 28]; by default the bundled split's 500 held-out and
    4,500 training digits.
    """

    name = PRIMARY_KEYS["digits"]
    description = (
        "digits: kernel distance (KID, unbiased at any N) of classifier features vs held-out real digits "
        "(0 = as good as real digits, quality/kid_std its standard error; lower is better)"
    )
    keys = (
        "quality/kid",
        "quality/kid_std",
        "quality/kid_floor",
        "quality/fd",
        "quality/fd_floor",
        "quality/fd_ratio",
        "quality/degenerate",
        "quality/class_share_max_dev",
        "quality/class_share_min",
        "quality/class_share_max",
    )

    def __init__(
        self,
        num_samples: int = 256,
        *,
        reference: torch.Tensor | None = None,
        train_images: torch.Tensor | None = None,
        device: str | torch.device | None = None,
        classifier_path: str | Path | None = None,
    ) -> None:
        if int(num_samples) < 2:
            raise ConfigError(f"quality num_samples must be >= 2, got {num_samples}")
        if reference is None or train_images is None:
            split = digits.bundled_split()
            reference = split["val_images"] if reference is None else reference
            train_images = split["train_images"] if train_images is None else train_images
        if len(reference) < 2:
            raise ConfigError(f"the digit metric needs at least 2 reference digits, got {len(reference)}")
        self.num_samples = int(num_samples)
        self.device = pick_device("cpu" if device is None else device)
        self.model = digits.load_classifier(classifier_path, device=self.device)
        self.reference_count = len(reference)
        ref_feats = digits.features(self.model, reference)
        self.val_stats = gaussian_stats(ref_feats)
        self.kernel_reference = KernelReference.of(ref_feats)
        self._train_images = train_images
        self._order = np.random.default_rng(FLOOR_SEED).permutation(len(train_images))
        self._floors: dict[int, tuple[float, float]] = {}
        self.floor(self.num_samples)

    def floor(self, n: int) -> tuple[float, float]:
        """(Fréchet distance, KID) of ``n`` random real training digits (fixed seed) to the reference."""
        n = min(int(n), len(self._train_images))
        if n not in self._floors:
            feats = digits.features(self.model, self._train_images[torch.as_tensor(self._order[:n])])
            self._floors[n] = (frechet_distance(gaussian_stats(feats), self.val_stats),
                               kernel_distance(feats, self.kernel_reference)[0])
        return self._floors[n]

    def score(self, samples: np.ndarray | torch.Tensor) -> dict[str, Any]:
        """Everything ``__call__`` returns, unprefixed, plus the 10 class shares (``class_shares``, None where
        undefined), ``num_samples``, ``floor_count`` and ``reference_count``."""
        n = check_count(samples)
        x = digits.to_float(samples)
        degenerate = degenerate_mask(x)
        feats, predicted = digits.features_and_predictions(self.model, x)
        shares = class_shares(predicted[~degenerate])
        kid, kid_std = kernel_distance(feats, self.kernel_reference)
        fd = frechet_distance(gaussian_stats(feats), self.val_stats)
        fd_floor, kid_floor = self.floor(n)
        defined = not np.isnan(shares).any()
        return {
            "kid": kid,
            "kid_std": kid_std,
            "kid_floor": kid_floor,
            "fd": fd,
            "fd_floor": fd_floor,
            "fd_ratio": fd / fd_floor if fd_floor > 0 else math.inf,
            "degenerate": float(degenerate.mean()),
            "class_share_max_dev": float(np.abs(shares - 0.1).max()) if defined else 0.9,
            "class_share_min": float(shares.min()) if defined else 0.0,
            "class_share_max": float(shares.max()) if defined else 1.0,
            "class_shares": [None if np.isnan(s) else float(s) for s in shares],
            "num_samples": n,
            "floor_count": min(n, len(self._train_images)),
            "reference_count": self.reference_count,
        }

    def __call__(self, samples: torch.Tensor) -> dict[str, float]:
        result = self.score(samples)
        return {key: float(result[key.removeprefix("quality/")]) for key in self.keys}
