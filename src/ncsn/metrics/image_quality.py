"""The sample-quality metrics of image data other than 28x28 digits (CIFAR-10, CelebA, ...): the kernel distance
(KID, unbiased at any N) in the standard Inception's features when its weights are on the machine, else in
8x8-pooled pixels (an honest offline stand-in with its own key, never mixed with the Inception numbers).

Reference: up to ``REFERENCE_SIZE`` (2,000) images of the data's validation split (the CIFAR-10 test batch,
CelebA's ``valid`` partition: never trained on); floor: N real TRAINING images scored the same way (0 up to
noise: what a perfect sampler gets). Built by ``ncsn.metrics.quality.quality_metric_for``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ncsn.devices import pick_device
from ncsn.errors import ConfigError
from ncsn.metrics.base import SampleQuality
from ncsn.metrics.distances import (
    KernelReference,
    check_count,
    frechet_distance,
    gaussian_stats,
    kernel_distance,
)
from ncsn.metrics.images import image01, inception_input
from ncsn.metrics.registry import PRIMARY_KEYS

__all__ = ["REFERENCE_SIZE", "InceptionQuality", "PixelQuality", "real_images"]

REFERENCE_SIZE = 2000
KID_SCALE = 1e3  # KID values are logged x1e3 (the published "KID x 10^3" convention)


def real_images(dataset: Any, n: int, *, seed: int = 0) -> torch.Tensor:
    """The first ``min(n, len(dataset))`` images of ``dataset`` in [0, 1], stacked [n, C, H, W]; the
    dequantisation noise is drawn from ``seed`` and the global RNG is left as it was."""
    count = min(int(n), len(dataset))
    if count < 2:
        raise ConfigError(f"the quality metric needs at least 2 real images, the data has {len(dataset)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        images = [dataset[i] for i in range(count)]
    return image01(torch.stack([item[0] if isinstance(item, (tuple, list)) else item for item in images]))


class _KernelImageQuality(SampleQuality):
    """KID (x1e3, with its jackknife standard error) and the Fréchet distance of one feature map, between the
    samples and the reference; the floor is N real training images' KID."""


    def __init__(self, reference: torch.Tensor, floor_images: torch.Tensor, num_samples: int) -> None:
        reference = image01(reference)
        self.num_samples = int(num_samples)
        self.shape = tuple(reference.shape[1:])
        self.reference_count = len(reference)
        feats = self.features(reference)
        self.reference_stats = gaussian_stats(feats)
        self.kernel_reference = KernelReference.of(feats)
        self.floor_count = len(floor_images)
        self.kid_floor = kernel_distance(self.features(image01(floor_images)), self.kernel_reference)[0] * KID_SCALE

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.name, f"{self.name}_std", f"{self.name}_floor", self.fd_key)

    fd_key = ""

    def features(self, x01: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, samples: torch.Tensor) -> dict[str, float]:
        check_count(samples)
        x = image01(samples, channels=self.shape[0])
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"expected images [N, {', '.join(map(str, self.shape))}], got shape {tuple(x.shape)}")
        feats = self.features(x)
        kid, kid_std = kernel_distance(feats, self.kernel_reference)
        return {self.name: kid * KID_SCALE, f"{self.name}_std": kid_std * KID_SCALE,
                f"{self.name}_floor": self.kid_floor,
                self.fd_key: frechet_distance(gaussian_stats(feats), self.reference_stats)}


class PixelQuality(_KernelImageQuality):
    """``quality/kid_pixels`` (x1e3): KID of 8x8 average-pooled pixels (C x 64 features) vs the reference images;
    ``quality/fd_pixels`` the Fréchet distance of the same. Deterministic and offline, good enough to rank runs
    of ONE dataset; NOT comparable with Inception numbers or published ones. Used without the Inception weights."""

    name = PRIMARY_KEYS["pixels"]
    fd_key = "quality/fd_pixels"
    description = (
        "images: kernel distance (KID x1e3, unbiased at any N) of 8x8-pooled pixels vs held-out real images "
        "(offline stand-in, NOT comparable with Inception KID/FID; lower is better)"
    )
    POOL = 8

    def features(self, x01: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x01.cpu().double(), self.POOL).flatten(1)


class InceptionQuality(_KernelImageQuality):
    """``quality/kid_inception`` (x1e3): KID in the standard Inception's 2048-d pool features vs the reference
    images, the number published as "KID x 10^3"; ``quality/fid`` the FID of the same features at this N
    (biased upward at small N: comparable only at the same N)."""

    name = PRIMARY_KEYS["inception"]
    fd_key = "quality/fid"
    description = (
        "images: kernel Inception distance (KID x1e3, unbiased at any N) vs held-out real images "
        "(lower is better); quality/fid at this N"
    )

    def __init__(self, reference: torch.Tensor, floor_images: torch.Tensor, num_samples: int, *,
                 weights: str | None, device: str | torch.device | None = None, batch_size: int = 250) -> None:
        from ncsn.metrics.features import inception_feature_net

        self.device = pick_device(device)
        self.batch_size = int(batch_size)
        self.net = inception_feature_net(weights).to(self.device)
        super().__init__(reference, floor_images, num_samples)

    def features(self, x01: torch.Tensor) -> torch.Tensor:
        out = []
        with torch.inference_mode(), torch.autocast(device_type=self.device.type, enabled=False):
            for chunk in x01.split(self.batch_size):
                out.append(self.net(inception_input(chunk.to(self.device))).double().cpu())
        return torch.cat(out)
