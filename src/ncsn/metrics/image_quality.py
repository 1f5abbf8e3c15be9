"""The sample-quality metrics of image data other than 28x28 digits (CIFAR-10, CelebA, ...): FID with the standard
Inception when its weights are on the machine, else an honest offline stand-in (``quality/fd_pixels``).

Chosen by ``ncsn.metrics.quality.quality_metric_for``; see that module for the interface.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ncsn.errors import ConfigError
from ncsn.metrics.features import _hub_weights_path, inception_available, resolve_inception_weights
from ncsn.metrics.quality import SampleQuality, _count, _image01, frechet_distance, gaussian_stats

__all__ = ["InceptionFIDQuality", "PixelFrechetQuality", "real_images"]


def real_images(datamodule: Any, n: int, *, seed: int = 0) -> torch.Tensor:
    """The first ``n`` images of the datamodule's validation set (then its training set, if the validation set
    is smaller), in [0, 1], stacked [n, C, H, W]; the dequantisation noise is drawn from ``seed`` and the
    global RNG is left as it was."""
    if getattr(datamodule, "val_set", None) is None or getattr(datamodule, "train_set", None) is None:
        datamodule.setup("fit")
    images: list[torch.Tensor] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for dataset in (datamodule.val_set, datamodule.train_set):
            for i in range(min(len(dataset), n - len(images))):
                item = dataset[i]
                images.append(item[0] if isinstance(item, (tuple, list)) else item)
            if len(images) >= n:
                break
    if len(images) < 2:
        raise ConfigError(f"the quality metric needs at least 2 real images, the data has {len(images)}")
    return _image01(torch.stack(images))


def _check_images(samples: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    x = _image01(samples)
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(shape):
        raise ValueError(f"expected images [N, {', '.join(map(str, shape))}], got shape {tuple(x.shape)}")
    return x


class PixelFrechetQuality(SampleQuality):
    """``quality/fd_pixels``: Fréchet distance between the samples and N real images (computed once), both
    average-pooled to 8x8 pixels (C x 64 features, float64). Deterministic and offline, good enough to rank
    runs of ONE dataset; NOT an FID and not comparable with published numbers. Used when the standard
    Inception weights are not on the machine."""

    name = "quality/fd_pixels"
    description = (
        "images: Fréchet distance of 8x8 average-pooled pixels vs real images (offline stand-in, "
        "NOT comparable with FID; lower is better)"
    )
    keys = ("quality/fd_pixels",)
    POOL = 8

    def __init__(self, real: torch.Tensor, num_samples: int | None = None) -> None:
        real = _image01(real)
        self.num_samples = int(num_samples or len(real))
        self.shape = tuple(real.shape[1:])
        self.real_stats = gaussian_stats(self._features(real))

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x.double(), self.POOL).flatten(1)

    def __call__(self, samples: torch.Tensor) -> dict[str, float]:
        _count(samples)
        x = _check_images(samples, self.shape).cpu()
        return {"quality/fd_pixels": frechet_distance(gaussian_stats(self._features(x)), self.real_stats)}


class InceptionFIDQuality(SampleQuality):
    """``quality/fid``: FID with the standard Inception (2048-d pool features, torchmetrics) between the samples
    and N real images, whose features are computed once. Comparable with other FIDs only at the same N (small-N
    FIDs are biased upward: papers use 50,000 samples)."""

    name = "quality/fid"
    description = "images: FID (standard Inception-v3, 2048-d) vs real images at the same N (lower is better)"
    keys = ("quality/fid",)

    def __init__(
        self,
        real: torch.Tensor,
        *,
        weights: str | None,
        device: str | torch.device | None = None,
        num_samples: int | None = None,
        batch_size: int = 250,
    ) -> None:
        from ncsn.metrics.fid import _feed, build_fid_metric

        self._feed = _feed
        self.device = (
            torch.device(device)
            if device is not None
            else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        )
        self.batch_size = int(batch_size)
        real = _image01(real)
        self.num_samples = int(num_samples or len(real))
        self.shape = tuple(real.shape[1:])
        with torch.inference_mode(), torch.autocast(device_type=self.device.type, enabled=False):
            self.metric = build_fid_metric(
                2048, inception_weights=weights, allow_download=False, reset_real_features=False
            ).to(self.device)
            self._feed([(self.metric, {"real": True})], real, batch_size=self.batch_size, device=self.device)

    def __call__(self, samples: torch.Tensor) -> dict[str, float]:
        _count(samples)
        x = _check_images(samples, self.shape)
        with torch.inference_mode(), torch.autocast(device_type=self.device.type, enabled=False):
            self.metric.reset()  # the fake features only; the real ones are kept
            self._feed([(self.metric, {"real": False})], x, batch_size=self.batch_size, device=self.device)
            return {"quality/fid": float(self.metric.compute())}


def _inception_weights(inception_weights: str | Path | None) -> tuple[str | None, str]:
    """(weights file, "") when the standard Inception can run offline, else (None, why not)."""
    if not inception_available():
        return None, "torch-fidelity is not installed (pip install torch-fidelity)"
    if inception_weights is not None and str(inception_weights) != "":
        return resolve_inception_weights(
            inception_weights, allow_download=False
        ), ""  # a bad path is an error
    try:
        return resolve_inception_weights(None, allow_download=False), ""
    except ConfigError:
        return None, f"the standard Inception weights are not on this machine (no {_hub_weights_path()})"
