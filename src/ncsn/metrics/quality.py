"""One offline sample-quality metric per shipped dataset, behind one interface (``SampleQuality``).

``quality_metric_for(datamodule, num_samples=N)`` (or ``ncsn.app.datamodules.quality_metric_for_data``) builds the
metric of a dataset once: everything on the real-data side (reference features, floors) is computed at
construction, so each call only featurises the samples. A call takes samples and returns plain floats whose keys
all start with ``quality/``; ``metric.name`` is the primary key (lower is better). Which metric and which key each
dataset gets is decided in ``ncsn.metrics.registry``:

* digits (``DigitQuality``, ``digit_quality``): ``quality/kid``, KID of the shipped classifier's features vs
  held-out digits (the bundled split's 500, or the MNIST test set with ``data=mnist``);
* the toy mixture (``ToyMixtureQuality``, ``toy_quality``): ``quality/energy_distance``;
* other images (``image_quality``): ``quality/kid_inception`` (x1e3) in Inception features
  (``InceptionQuality``) when its weights are given or cached, else ``quality/kid_pixels`` (x1e3,
  ``PixelQuality``) and one warning line.

Every primary is an unbiased estimator: its expected value is the same at any sample count N (only its noise,
reported as ``<key>_std`` where there is one, shrinks with N). The Fréchet distances (``fd``, ``fd_ratio``,
``fid``, ``fd_pixels``) are kept as secondary keys, comparable only at the same N.

Samples: images in [0, 1], float ``[N, C, H, W]`` (uint8 in [0, 255] and ``[N, H, W, C]`` are accepted too:
``images.image01``), or 2-D points ``[N, 2]`` in data space. Any N >= 2 works.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ncsn.errors import ConfigError
from ncsn.metrics.base import SampleQuality
from ncsn.metrics.digit_quality import DigitQuality, class_shares, degenerate_mask
from ncsn.metrics.distances import frechet_distance, gaussian_stats, kernel_distance
from ncsn.metrics.registry import quality_kind
from ncsn.metrics.toy_quality import ToyMixtureQuality

log = logging.getLogger(__name__)

__all__ = [
    "DigitQuality",
    "SampleQuality",
    "ToyMixtureQuality",
    "class_shares",
    "degenerate_mask",
    "digit_reference",
    "frechet_distance",
    "gaussian_stats",
    "kernel_distance",
    "quality_metric_for",
]

#: at most this many held-out digits form the digit reference of the bundled data (its default validation split)
BUNDLED_REFERENCE = 500


def digit_reference(datamodule: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference, training) uint8 digits [N, 28, 28] of a digits datamodule: the reference is held out from the
    run's own training split. Bundled digits: the first ``BUNDLED_REFERENCE`` of the run's validation split (the
    split's default 500; fewer with ``data.val_size < 500``, said in one warning line). ``data=mnist``: the whole
    MNIST test set (t10k files)."""
    datamodule.setup("fit")  # a missing file is one DataNotFoundError line
    val, train = datamodule.val_set, datamodule.train_set
    if datamodule.name == "mnist":  # torchvision MNIST: .data holds the raw uint8 digits
        return val.data, train.data
    if len(val) < BUNDLED_REFERENCE:
        log.warning("quality: data.val_size=%d < %d: the digit metric's reference is the run's %d held-out digits "
                    "(noisier, and not comparable with runs that hold out %d)", len(val), BUNDLED_REFERENCE,
                    len(val), BUNDLED_REFERENCE)
    return val.images[:BUNDLED_REFERENCE], train.images


def quality_metric_for(
    datamodule: Any,
    *,
    num_samples: int,
    device: str | torch.device | None = None,
    inception_weights: str | Path | None = None,
) -> SampleQuality | None:
    """The sample-quality metric of ``datamodule``'s data (None when the data has none; see the module doc).

    ``inception_weights`` (the setting ``paths.inception_weights``): the standard Inception's weights file for
    non-digit images; without it (and without the file in torch hub's cache) ``quality/kid_pixels`` replaces
    ``quality/kid_inception`` and one warning line says so.
    """
    from ncsn.data.datasets import IMAGE_DATASETS

    if int(num_samples) < 2:
        raise ConfigError(f"quality num_samples must be >= 2, got {num_samples}")
    name = getattr(datamodule, "name", None)  # the datamodules of ncsn.app.datamodules, or any with their fields
    if name == "toy_gmm":
        return ToyMixtureQuality(num_samples)
    if name not in IMAGE_DATASETS:
        return None
    kind = quality_kind({"name": datamodule.name, "image_size": datamodule.image_size},
                        inception_weights=inception_weights)
    if kind == "digits":
        reference, train = digit_reference(datamodule)
        return DigitQuality(num_samples, reference=reference, train_images=train, device=device)
    from ncsn.metrics import image_quality
    from ncsn.metrics.features import INCEPTION_WEIGHTS_URL, hub_weights_path, resolve_inception_weights

    datamodule.setup("fit")
    reference = image_quality.real_images(datamodule.val_set, image_quality.REFERENCE_SIZE)
    floor = image_quality.real_images(datamodule.train_set, int(num_samples), seed=1)
    if kind == "inception":
        weights = resolve_inception_weights(inception_weights, allow_download=False)  # a bad path is an error
        return image_quality.InceptionQuality(reference, floor, num_samples, weights=weights, device=device)
    log.warning(
        "quality: no Inception features for %s (the weights are not given and not at %s): logging "
        "quality/kid_pixels instead (KID of 8x8-pooled pixels, NOT comparable with Inception KID/FID). For "
        "quality/kid_inception download %s and set paths.inception_weights=<path> (train.py and sample.py)",
        datamodule.name, hub_weights_path(), INCEPTION_WEIGHTS_URL,
    )
    return image_quality.PixelQuality(reference, floor, num_samples)
