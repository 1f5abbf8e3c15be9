"""FID and Inception Score through torchmetrics: metric builders, feeding image batches, ``compute_image_metrics``.

See ``ncsn.metrics`` for the image conventions and how to read the numbers.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore

from ncsn.devices import pick_device
from ncsn.errors import ConfigError
from ncsn.metrics.features import (
    _custom_feature,
    _require_fidelity,
    _standard_feature,
    _wrap_build_errors,
    feature_name,
    resolve_inception_weights,
)
from ncsn.metrics.images import image01, inception_input

__all__ = [
    "build_fid_metric",
    "build_inception_score_metric",
    "compute_image_metrics",
    "iter_image_batches",
]


def build_fid_metric(
    feature: int | str | nn.Module = 2048,
    *,
    inception_weights: str | os.PathLike | None = None,
    allow_download: bool | None = None,
    antialias: bool = False,
    reset_real_features: bool = True,
) -> FrechetInceptionDistance:
    """A torchmetrics FID metric (on CPU; move it with ``.to(device)``), not synced across processes.

    With the standard Inception it takes uint8 RGB images (``normalize=False``); a custom network gets
    float images in [0, 1]. ``compute_image_metrics`` and ``FIDCallback`` convert model-range images.
    """
    layer = _standard_feature(feature)
    if layer is not None:
        weights = resolve_inception_weights(inception_weights, allow_download=allow_download)
        _require_fidelity()
        return _wrap_build_errors(
            FrechetInceptionDistance,
            feature=layer,
            feature_extractor_weights_path=weights,
            weights_file=weights,
            antialias=antialias,
            normalize=False,  # we hand it uint8 ourselves (rounded, not truncated)
            reset_real_features=reset_real_features,
            sync_on_compute=False,
        )
    module = _custom_feature(feature)
    return FrechetInceptionDistance(
        feature=module,
        normalize=True,  # custom nets get float images in [0, 1]; only matters for the dummy input
        reset_real_features=reset_real_features,
        sync_on_compute=False,
    )


def build_inception_score_metric(
    feature: int | str | nn.Module = 2048,
    *,
    is_feature: nn.Module | None = None,
    inception_weights: str | os.PathLike | None = None,
    allow_download: bool | None = None,
    antialias: bool = False,
    splits: int = 10,
) -> InceptionScore | None:
    """A torchmetrics Inception Score metric, or ``None`` when there is no classifier to compute it with.

    ``is_feature`` (a module returning logits [N, num_classes] for float images in [0, 1]) wins; otherwise
    the standard Inception's logits are used when ``feature`` is the standard network; otherwise ``None``.
    """
    if splits < 1:
        raise ConfigError(f"metrics splits must be >= 1, got {splits}")
    if is_feature is not None:
        if not isinstance(is_feature, nn.Module):
            raise ConfigError(
                "metrics is_feature must be an nn.Module returning class logits [N, num_classes]"
            )
        return _wrap_build_errors(
            InceptionScore, feature=is_feature, splits=splits, normalize=False, sync_on_compute=False
        )
    if _standard_feature(feature) is None:
        return None
    weights = resolve_inception_weights(inception_weights, allow_download=allow_download)
    _require_fidelity()
    from torchmetrics.image.fid import NoTrainInceptionV3

    net = _wrap_build_errors(
        NoTrainInceptionV3,
        name="inception-v3-compat",
        features_list=["logits_unbiased"],
        feature_extractor_weights_path=weights,
        weights_file=weights,
        antialias=antialias,
    )
    return _wrap_build_errors(
        InceptionScore, feature=net, splits=splits, normalize=False, sync_on_compute=False
    )


# --------------------------------------------------------------------------------------------------------
# Feeding images
# --------------------------------------------------------------------------------------------------------


def _uses_standard_inception(metric: FrechetInceptionDistance | InceptionScore) -> bool:
    from torchmetrics.image.fid import NoTrainInceptionV3

    return isinstance(getattr(metric, "inception", None), NoTrainInceptionV3)


def _prepare(images: torch.Tensor, standard: bool, device: torch.device) -> torch.Tensor:
    """Model-range images -> what the feature network takes (uint8 RGB for Inception, float [0, 1] else)."""
    if not torch.is_tensor(images) or images.dim() != 4:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ConfigError(f"metrics expect image batches [N, C, H, W], got {shape}")
    x = image01(images.detach().to(device))
    return inception_input(x) if standard else x


def iter_image_batches(source: Any, batch_size: int, limit: int | None = None) -> Iterator[torch.Tensor]:
    """Image batches of at most ``batch_size`` from a tensor [N, C, H, W] or an iterable of batches.

    Batches may be tensors or ``(images, labels, ...)`` tuples/lists (a DataLoader over a labelled
    dataset); stops after ``limit`` images when given.
    """
    if batch_size < 1:
        raise ConfigError(f"metrics batch_size must be >= 1, got {batch_size}")
    remaining = math.inf if limit is None else int(limit)
    batches: Iterable[Any] = [source] if torch.is_tensor(source) else source
    for batch in batches:
        if isinstance(batch, (tuple, list)):
            if not batch:
                continue
            batch = batch[0]
        elif isinstance(batch, dict):
            key = next((k for k in ("image", "images", "x") if k in batch), None)
            if key is None:
                raise ConfigError(f"metrics got a dict batch without an 'image' key: {sorted(batch)}")
            batch = batch[key]
        if not torch.is_tensor(batch):
            raise ConfigError(
                f"metrics expect image tensors or (images, labels) batches, got {type(batch).__name__}"
            )
        if batch.dim() == 3:  # a single image
            batch = batch.unsqueeze(0)
        for chunk in batch.split(batch_size):
            if remaining <= 0:
                return
            if chunk.shape[0] > remaining:
                chunk = chunk[: int(remaining)]
            remaining -= chunk.shape[0]
            yield chunk
        if remaining <= 0:
            return


def _progress(it: Iterable, enabled: bool, desc: str) -> Iterable:
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return it
    return tqdm(it, desc=desc, unit="batch")


def _feed(
    metrics: list[tuple[Any, dict]],
    source: Any,
    *,
    batch_size: int,
    device: torch.device,
    limit: int | None = None,
    progress: bool = False,
    desc: str = "",
) -> int:
    """Update every ``(metric, update_kwargs)`` with the batches of ``source``; returns the image count."""
    count = 0
    for batch in _progress(iter_image_batches(source, batch_size, limit), progress, desc):
        for metric, kwargs in metrics:
            metric.update(_prepare(batch, _uses_standard_inception(metric), device), **kwargs)
        count += batch.shape[0]
    return count


def compute_image_metrics(
    real: Any,
    fake: Any,
    *,
    feature: int | str | nn.Module = 2048,
    is_feature: nn.Module | None = None,
    inception_weights: str | os.PathLike | None = None,
    allow_download: bool | None = None,
    batch_size: int = 250,
    device: str | torch.device | None = None,
    inception_score: bool = True,
    splits: int = 10,
    max_real: int | None = None,
    max_fake: int | None = None,
    antialias: bool = False,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """FID between ``real`` and ``fake``, and the Inception Score of ``fake``.

    ``real`` / ``fake``: model-range images, a tensor [N, C, H, W] or an iterable of batches (tensors or
    ``(images, labels)``, e.g. a DataLoader); ``max_real`` / ``max_fake`` cap the counts. ``feature``: 2048
    (64/192/768) for the standard Inception (``inception_weights``: its weights file, needed offline), or
    ``"small"`` / any module mapping images to [N, F] features. IS uses ``is_feature`` (a module returning
    class logits) when given, else the Inception logits with the standard network, else it is skipped
    (``None``), as it is with ``inception_score=False``. ``seed`` fixes IS's shuffling into splits;
    ``is_std`` is 0.0 with ``splits=1``.

    Returns ``{"fid", "is_mean", "is_std", "num_real", "num_fake", "feature"}``.
    """
    dev = pick_device(device)
    with torch.inference_mode(), torch.autocast(device_type=dev.type, enabled=False):
        fid = build_fid_metric(
            feature, inception_weights=inception_weights, allow_download=allow_download, antialias=antialias
        ).to(dev)
        isc = None
        if inception_score:
            isc = build_inception_score_metric(
                feature,
                is_feature=is_feature,
                inception_weights=inception_weights,
                allow_download=allow_download,
                antialias=antialias,
                splits=splits,
            )
            isc = isc.to(dev) if isc is not None else None
        num_real = _feed(
            [(fid, {"real": True})],
            real,
            batch_size=batch_size,
            device=dev,
            limit=max_real,
            progress=progress,
            desc="FID real",
        )
        fake_metrics: list[tuple[Any, dict]] = [(fid, {"real": False})]
        if isc is not None:
            fake_metrics.append((isc, {}))
        num_fake = _feed(
            fake_metrics,
            fake,
            batch_size=batch_size,
            device=dev,
            limit=max_fake,
            progress=progress,
            desc="FID fake",
        )
        if num_real < 2 or num_fake < 2:
            raise ConfigError(f"FID needs at least 2 real and 2 fake images, got {num_real} and {num_fake}")
        fid_value = float(fid.compute())
        is_mean = is_std = None
        if isc is not None:
            with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
                torch.manual_seed(seed)  # IS shuffles the samples into splits with the global RNG
                warnings.filterwarnings("ignore", message=".*degrees of freedom.*")  # std of 1 split
                mean, std = isc.compute()
            is_mean, is_std = float(mean), (float(std) if splits > 1 else 0.0)
    return {
        "fid": fid_value,
        "is_mean": is_mean,
        "is_std": is_std,
        "num_real": num_real,
        "num_fake": num_fake,
        "feature": feature_name(feature),
    }

