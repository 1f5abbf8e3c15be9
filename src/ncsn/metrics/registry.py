"""Which sample-quality metric each dataset gets, and its primary key: decided from a data config or name alone,
without building the metric (no models, no Lightning), so that sweeps, reports and checkpoint monitors agree on the
key before any sample is drawn.

==============================  ========  ==================================  =====================================
data                            kind      primary key (lower is better)       built by
==============================  ========  ==================================  =====================================
mnist, mnist_bundled (28x28)    digits    ``quality/kid``                     ``digit_quality.DigitQuality``
toy_gmm                         toy       ``quality/energy_distance``         ``toy_quality.ToyMixtureQuality``
other images, Inception weights inception ``quality/kid_inception`` (x1e3)    ``image_quality.InceptionQuality``
other images, no weights        pixels    ``quality/kid_pixels`` (x1e3)       ``image_quality.PixelQuality``
==============================  ========  ==================================  =====================================

The Inception is used when its weights are given (``paths.inception_weights``) or sit in torch hub's cache.

Each key names one feature space and one unit, so a dashboard panel never mixes two: ``quality/kid`` is the digit
classifier's KID in raw feature units; the image KIDs are x1e3 (the published "KID x 10^3") and say their features
in the name (``_inception``, ``_pixels``). Values of different keys, or of different datasets, are not comparable.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["PRIMARY_KEYS", "data_fields", "primary_quality_key", "primary_quality_keys", "quality_key_in",
           "quality_kind"]

#: the primary key of each kind of metric
PRIMARY_KEYS = {
    "digits": "quality/kid",
    "toy": "quality/energy_distance",
    "inception": "quality/kid_inception",
    "pixels": "quality/kid_pixels",
}


def primary_quality_keys() -> tuple[str, ...]:
    """Every primary key, each once."""
    return tuple(dict.fromkeys(PRIMARY_KEYS.values()))


def quality_key_in(metrics: Iterable[str]) -> str | None:
    """The primary sample-quality key present in ``metrics`` (a run's logged metrics), or None."""
    return next((key for key in primary_quality_keys() if key in metrics), None)


def inception_usable(inception_weights: str | Path | None) -> bool:
    """Whether the standard Inception will be used: torch-fidelity is installed and the weights are given
    (a missing given file is an error when the metric is built) or in torch hub's cache."""
    from ncsn.metrics.features import hub_weights_path, inception_available

    if not inception_available():
        return False
    return (inception_weights is not None and str(inception_weights) != "") or hub_weights_path().is_file()


def data_fields(data: str | Mapping | Any) -> dict[str, Any]:
    """A data config (``DictConfig`` or mapping with ``name`` / ``_target_``) or a dataset name as a plain dict."""
    if isinstance(data, str):
        return {"name": data}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(data, DictConfig):
            data = OmegaConf.to_container(data, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if not isinstance(data, Mapping):
        from ncsn.errors import ConfigError

        raise ConfigError(f"expected a data config or a dataset name, got {type(data).__name__}")
    fields = dict(data)
    if str(fields.get("_target_", "")).endswith("ToyDataModule"):
        fields.setdefault("name", "toy_gmm")
    return fields


def quality_kind(data: str | Mapping | Any, *, inception_weights: str | Path | None = None) -> str | None:
    """``digits``, ``toy``, ``inception``, ``pixels`` or None (no metric) for a data config or name."""
    from ncsn.data.datasets import IMAGE_DATASETS

    fields = data_fields(data)
    name, target = fields.get("name"), str(fields.get("_target_", ""))
    if name == "toy_gmm":
        return "toy"
    if name not in IMAGE_DATASETS or (target and not target.endswith("ImageDataModule")):
        return None
    if name in ("mnist", "mnist_bundled") and int(fields.get("image_size") or 28) == 28:
        return "digits"
    return "inception" if inception_usable(inception_weights) else "pixels"


def primary_quality_key(data: str | Mapping | Any, *, inception_weights: str | Path | None = None) -> str | None:
    """The primary key the data's metric logs (None when the data has no metric)."""
    kind = quality_kind(data, inception_weights=inception_weights)
    return None if kind is None else PRIMARY_KEYS[kind]
