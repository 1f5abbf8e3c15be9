"""One offline sample-quality metric per shipped dataset, behind one interface (``SampleQuality``).

``quality_metric_for(datamodule, num_samples=N)`` (or ``quality_metric_for_data(cfg_or_name, ...)``) builds the
metric of a dataset once: everything on the real-data side (reference features, floors) is computed at
construction, so each call only featurises the samples. A call takes samples and returns plain floats whose
keys all start with ``quality/``; ``metric.name`` is the primary key, and lower is better for every primary.

============================  =============================  ===============================================
data                          metric                         primary key (others)
============================  =============================  ===============================================
mnist, mnist_bundled (28x28)  ``DigitQuality``               ``quality/fd_ratio`` (``fd``, ``fd_floor``,
                                                             ``degenerate``, ``class_share_max_dev``,
                                                             ``class_share_min``, ``class_share_max``)
toy_gmm                       ``ToyMixtureQuality``          ``quality/sliced_wasserstein``
                                                             (``mode_weight_error``)
other images (cifar10,        ``InceptionFIDQuality`` when   ``quality/fid``
celeba, ...)                  the Inception weights are here
                              else ``PixelFrechetQuality``   ``quality/fd_pixels`` (NOT comparable with FID)
anything else                 ``None`` (no metric)
============================  =============================  ===============================================

The image metrics other than digits live in ``ncsn.metrics.image_quality``; the classifier in
``ncsn.metrics.digits``.

Samples: images in the image range [0, 1], float ``[N, C, H, W]`` (uint8 in [0, 255] is accepted too; values
outside [0, 1] are clamped and non-finite ones mapped to 0 / 1), or 2-D points ``[N, 2]`` in data space.
Any N >= 2 works; Fréchet distances are biased upward at small N, which is why the digit metric divides by
the real-vs-real floor at the same N. Numbers are comparable only at the same N.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ncsn.errors import ConfigError
from ncsn.metrics import digits
from ncsn.metrics.features import INCEPTION_WEIGHTS_URL, _hub_weights_path

log = logging.getLogger(__name__)

__all__ = [
    "DigitQuality",
    "SampleQuality",
    "ToyMixtureQuality",
    "class_shares",
    "degenerate_mask",
    "frechet_distance",
    "gaussian_stats",
    "quality_metric_for",
    "quality_metric_for_data",
]

# degenerate-sample rule, calibrated on the 5,000 real bundled digits (none is flagged: their pixel std is
# >= 0.148, their mean and their share of pixels above 0.5 are <= 0.31); uniform noise and grey blobs are.
DEGENERATE_STD_MIN = 0.10
DEGENERATE_MEAN_MAX = 0.35
DEGENERATE_BRIGHT_SHARE_MAX = 0.35  # share of pixels above 0.5
FLOOR_SEED = 0


# ---------------------------------------------------------------------------------------------- pieces
def gaussian_stats(feats: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64) of features [N, F], N >= 2."""
    f = np.asarray(feats.detach().cpu() if torch.is_tensor(feats) else feats, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"Fréchet statistics need features [N >= 2, F], got shape {f.shape}")
    return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))


def _one_blas_thread() -> contextlib.AbstractContextManager:
    """One BLAS thread for the small matrices here: on a busy CPU, OpenBLAS's thread pool makes a 128x128
    eigendecomposition 50x slower (4 ms -> 0.2 s measured)."""
    try:
        from threadpoolctl import threadpool_limits  # installed with scikit-learn (a dependency of mlxtend)
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def frechet_distance(stats1: tuple[np.ndarray, np.ndarray], stats2: tuple[np.ndarray, np.ndarray]) -> float:
    """‖μ1 − μ2‖² + tr(C1 + C2 − 2 (C1^½ C2 C1^½)^½), in float64 through symmetric eigendecompositions (stable
    for the rank-deficient covariances of small sample counts)."""
    mu1, c1 = stats1
    mu2, c2 = stats2
    with _one_blas_thread():
        w, v = np.linalg.eigh(c1)
        root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        middle = root1 @ c2 @ root1
        cross = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(max(0.0, ((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2.0 * cross))


def _image01(samples: np.ndarray | torch.Tensor) -> torch.Tensor:
    """float32 images in [0, 1] on the CPU or the input's device (uint8 / 255; float clamped, NaN -> 0)."""
    x = samples if torch.is_tensor(samples) else torch.as_tensor(np.asarray(samples))
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    return torch.nan_to_num(x.detach().float(), nan=0.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0)


def degenerate_mask(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """True for each degenerate image (uint8 in [0, 255] or float in [0, 1]; [N, ...]): pixel std < 0.10
    (near-constant: blank or flat grey), or mean > 0.35, or more than 35 % of the pixels above 0.5."""
    x = _image01(images).cpu().double().reshape(len(images), -1).numpy()
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


def _count(samples: Any) -> int:
    n = len(samples)
    if n < 2:
        raise ValueError(f"sample quality needs at least 2 samples, got {n}")
    return n


def _device(device: str | torch.device | None) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cpu")


# ---------------------------------------------------------------------------------------------- interface
class SampleQuality:
    """A sample-quality metric of one dataset. Call it on samples; it returns ``{key: float}``.

    ``name``: the primary key (lower is better), always in the result; ``keys``: every key it returns (all
    start with ``quality/``); ``description``: one line for logs, README and metrics.json; ``num_samples``: the
    sample count it was built for (its floors / real side are sized for it; any N >= 2 works).
    """

    name: str = "quality/unknown"
    description: str = ""
    keys: tuple[str, ...] = ()
    num_samples: int = 0

    def __call__(self, samples: torch.Tensor) -> dict[str, float]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, num_samples={self.num_samples})"


class DigitQuality(SampleQuality):
    """28x28 grey digits, scored with the shipped digit classifier (``ncsn.metrics.digits``) against the 500
    held-out bundled digits.

    * ``quality/fd``: Fréchet distance between Gaussians fitted to the classifier's 128-d features of all N
      samples and of the 500 held-out digits (an MNIST "FID");
    * ``quality/fd_floor``: the same for N real TRAINING digits (a fixed random subset, seed 0; all 4,500 when
      N > 4,500): what a perfect sampler scores at this N;
    * ``quality/fd_ratio`` (primary): fd / floor (about 1 for real digits at any N);
    * ``quality/degenerate``: share of degenerate samples (``degenerate_mask``; no real digit is flagged);
    * ``quality/class_share_min`` / ``max`` / ``max_dev``: the predicted-class shares among the NON-degenerate
      samples, and the largest |share − 0.1| (0.9, its worst value, when every sample is degenerate).
    """

    name = "quality/fd_ratio"
    description = (
        "digits: Fréchet distance of classifier features vs the 500 held-out digits, divided by "
        "the real-digit floor at the same N (1 = as good as real digits; lower is better)"
    )
    keys = (
        "quality/fd_ratio",
        "quality/fd",
        "quality/fd_floor",
        "quality/degenerate",
        "quality/class_share_max_dev",
        "quality/class_share_min",
        "quality/class_share_max",
    )

    def __init__(
        self,
        num_samples: int = 256,
        *,
        device: str | torch.device | None = None,
        classifier_path: str | Path | None = None,
    ) -> None:
        if int(num_samples) < 2:
            raise ConfigError(f"quality num_samples must be >= 2, got {num_samples}")
        self.num_samples = int(num_samples)
        self.device = _device(device)
        self.model = digits.load_classifier(classifier_path, device=self.device)
        split = digits.bundled_split()
        self._train_images = split["train_images"]
        self.val_stats = gaussian_stats(digits.features(self.model, split["val_images"]))
        self._order = np.random.default_rng(FLOOR_SEED).permutation(len(self._train_images))
        self._floors: dict[int, float] = {}
        self.floor(self.num_samples)

    def floor(self, n: int) -> float:
        """Fréchet distance of ``n`` random real training digits (fixed seed) to the held-out digits."""
        n = min(int(n), len(self._train_images))
        if n not in self._floors:
            idx = torch.as_tensor(self._order[:n])
            feats = digits.features(self.model, self._train_images[idx])
            self._floors[n] = frechet_distance(gaussian_stats(feats), self.val_stats)
        return self._floors[n]

    def score(self, samples: np.ndarray | torch.Tensor) -> dict[str, Any]:
        """Everything ``__call__`` returns, unprefixed, plus the 10 class shares (``class_shares``, None where
        undefined), ``num_samples`` and ``floor_count``."""
        n = _count(samples)
        x = digits.to_float(samples)
        degenerate = degenerate_mask(x)
        feats, predicted = digits.features_and_predictions(self.model, x)
        shares = class_shares(predicted[~degenerate])
        fd = frechet_distance(gaussian_stats(feats), self.val_stats)
        floor = self.floor(n)
        defined = not np.isnan(shares).any()
        return {
            "fd_ratio": fd / floor if floor > 0 else math.inf,
            "fd": fd,
            "fd_floor": floor,
            "degenerate": float(degenerate.mean()),
            "class_share_max_dev": float(np.abs(shares - 0.1).max()) if defined else 0.9,
            "class_share_min": float(shares.min()) if defined else 0.0,
            "class_share_max": float(shares.max()) if defined else 1.0,
            "class_shares": [None if np.isnan(s) else float(s) for s in shares],
            "num_samples": n,
            "floor_count": min(n, len(self._train_images)),
        }

    def __call__(self, samples: torch.Tensor) -> dict[str, float]:
        result = self.score(samples)
        return {key: float(result[key.removeprefix("quality/")]) for key in self.keys}


class ToyMixtureQuality(SampleQuality):
    """2-D points against the known toy mixture (``ncsn.data.datasets``: ``GMM_WEIGHTS``, ``GMM_MEANS``,
    ``gmm_sample``; nothing is restated here).

    * ``quality/sliced_wasserstein`` (primary): sliced 1-Wasserstein distance between the samples and a fixed
      sample of the true mixture (``num_reference`` points, seed ``seed``), averaged over ``num_projections``
      evenly spaced directions (each 1-D W1 compares the samples' sorted projections with the reference's
      quantiles at the same levels);
    * ``quality/mode_weight_error``: each sample is assigned to the nearest mode centre; the largest
      |estimated weight − true weight| over the modes (with two modes: the error on the 0.2 mode).

    Non-finite coordinates count as far-away points (±1e3), so a diverged sampler scores badly, not NaN.
    """

    name = "quality/sliced_wasserstein"
    description = (
        "toy mixture: sliced 1-Wasserstein distance to the true 2-D mixture (lower is better); "
        "mode_weight_error = |estimated - true| weight of the modes"
    )
    keys = ("quality/sliced_wasserstein", "quality/mode_weight_error")

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
        reference = gmm_sample(int(num_reference), torch.Generator().manual_seed(seed)).double()
        self.reference_sorted = (reference @ self.directions.T).sort(dim=0).values  # [M, K]

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

    def __call__(self, samples: torch.Tensor) -> dict[str, float]:
        _count(samples)
        x = self._points(samples)
        nearest = torch.cdist(x, self.means).argmin(dim=1)
        shares = torch.bincount(nearest, minlength=len(self.weights)).double() / len(x)
        return {
            "quality/sliced_wasserstein": self.sliced_wasserstein(x),
            "quality/mode_weight_error": float((shares - self.weights).abs().max()),
        }


# ---------------------------------------------------------------------------------------------- choosing
def quality_metric_for(
    datamodule: Any,
    *,
    num_samples: int,
    device: str | torch.device | None = None,
    inception_weights: str | Path | None = None,
) -> SampleQuality | None:
    """The sample-quality metric of ``datamodule``'s data (see the module docstring), or None when there is none.

    ``num_samples``: the sample count each call will get (the floors and the real side are sized for it).
    ``device``: where the feature network runs (default: the CPU; the Inception: CUDA when available).
    ``inception_weights``: the standard Inception weights file for image data other than digits (default: torch
    hub's cache); without it, ``quality/fd_pixels`` replaces ``quality/fid`` and one warning line says so.
    """
    from ncsn.data.datamodules import ImageDataModule, ToyDataModule

    if int(num_samples) < 2:
        raise ConfigError(f"quality num_samples must be >= 2, got {num_samples}")
    if isinstance(datamodule, ToyDataModule):
        return ToyMixtureQuality(num_samples)
    if not isinstance(datamodule, ImageDataModule):
        return None
    if datamodule.name in ("mnist", "mnist_bundled") and tuple(datamodule.data_shape) == (1, 28, 28):
        return DigitQuality(num_samples, device=device)
    from ncsn.metrics.image_quality import (
        InceptionFIDQuality,
        PixelFrechetQuality,
        _inception_weights,
        real_images,
    )

    weights, why_not = _inception_weights(inception_weights)
    real = real_images(datamodule, int(num_samples))
    if weights is not None:
        return InceptionFIDQuality(real, weights=weights, device=device, num_samples=num_samples)
    log.warning(
        "quality: no FID for %s: %s; logging quality/fd_pixels instead (Fréchet distance of 8x8-pooled pixels, "
        "NOT comparable with FID). For quality/fid download %s and pass its path as inception_weights "
        "(sample.py: fid.inception_weights=<path>) or put it at %s",
        datamodule.name,
        why_not,
        INCEPTION_WEIGHTS_URL,
        _hub_weights_path(),
    )
    return PixelFrechetQuality(real, num_samples=num_samples)


_DATAMODULE_KEYS = (
    "name",
    "data_dir",
    "image_size",
    "channels",
    "center_crop",
    "verify_checksums",
    "val_size",
    "download",
)


def quality_metric_for_data(
    data: str | Mapping | Any,
    *,
    num_samples: int,
    device: str | torch.device | None = None,
    inception_weights: str | Path | None = None,
    data_dir: str | Path | None = None,
) -> SampleQuality | None:
    """``quality_metric_for`` from a data config (a ``data:`` node with ``_target_``, or a mapping with
    ``name``) or a dataset name (``mnist_bundled``, ``toy_gmm``, ``cifar10``, ...; ``data_dir`` for the files).
    Unknown names give None. Only the real images of non-digit image data are read from disk."""
    from ncsn.data.datamodules import ImageDataModule, ToyDataModule
    from ncsn.data.datasets import IMAGE_DATASETS

    if isinstance(data, str):
        cfg: dict[str, Any] = {"name": data}
    else:
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(data, DictConfig):
                data = OmegaConf.to_container(data, resolve=True)
        except ImportError:  # pragma: no cover - omegaconf is a dependency
            pass
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"quality_metric_for_data takes a data config or a dataset name, got {type(data).__name__}"
            )
        cfg = dict(data)
    target = str(cfg.get("_target_", ""))
    if target.endswith("ToyDataModule") or cfg.get("name") == "toy_gmm":
        return quality_metric_for(ToyDataModule(), num_samples=num_samples, device=device)
    name = cfg.get("name")
    if name not in IMAGE_DATASETS or (target and not target.endswith("ImageDataModule")):
        return None
    kwargs = {k: cfg[k] for k in _DATAMODULE_KEYS if cfg.get(k) is not None}
    kwargs["download"] = False  # the metric never downloads
    if data_dir is not None:
        kwargs["data_dir"] = str(data_dir)
    datamodule = ImageDataModule(**kwargs)
    return quality_metric_for(
        datamodule, num_samples=num_samples, device=device, inception_weights=inception_weights
    )
