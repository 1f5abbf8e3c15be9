"""Feature networks for the image metrics: the standard Inception (weights resolution) and ``SmallFeatureNet``.

See ``ncsn.metrics`` for how the feature networks are chosen (``feature=``) and how to read the numbers.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ncsn.errors import ConfigError

__all__ = [
    "INCEPTION_FEATURES",
    "INCEPTION_WEIGHTS_FILENAME",
    "INCEPTION_WEIGHTS_URL",
    "SmallFeatureNet",
    "feature_from_config",
    "feature_name",
    "hub_weights_path",
    "inception_available",
    "inception_feature_net",
    "resolve_inception_weights",
]

INCEPTION_FEATURES = (64, 192, 768, 2048)
INCEPTION_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILENAME
)


# --------------------------------------------------------------------------------------------------------
# Feature networks
# --------------------------------------------------------------------------------------------------------


class SmallFeatureNet(nn.Module):
    """A tiny fixed random conv net: images [N, C, H, W] -> features [N, num_features].

    The weights are drawn from ``seed`` (the global RNG is left as it was), the net never trains (always
    in eval mode, no gradients), and every input is resized to 32x32 first, so any image size works and
    features of different sizes are comparable. Input: float images in [0, 1] (uint8 in [0, 255] is
    accepted too); 1-channel input is repeated to ``in_channels`` = 3. Works offline; its FIDs are only
    comparable with FIDs from the same ``(in_channels, num_features, seed)``.
    """

    def __init__(self, in_channels: int = 3, num_features: int = 64, seed: int = 0) -> None:
        super().__init__()
        if in_channels not in (1, 3):
            raise ConfigError(f"SmallFeatureNet in_channels must be 1 or 3, got {in_channels}")
        if num_features < 1:
            raise ConfigError(f"SmallFeatureNet num_features must be >= 1, got {num_features}")
        self.in_channels = in_channels
        self.num_features = int(num_features)
        self.seed = seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.body = nn.Sequential(
                nn.Conv2d(in_channels, 32, 3, stride=1, padding=1),
                nn.LeakyReLU(0.2),
                nn.Conv2d(32, 64, 3, stride=2, padding=1),  # 16x16
                nn.LeakyReLU(0.2),
                nn.Conv2d(64, 128, 3, stride=2, padding=1),  # 8x8
                nn.LeakyReLU(0.2),
                nn.Conv2d(128, self.num_features, 3, stride=2, padding=1),  # 4x4
            )
            # He init (not PyTorch's default, which shrinks activations layer by layer): features of
            # order one, so FIDs land in a readable range.
            for layer in self.body:
                if isinstance(layer, nn.Conv2d):
                    nn.init.kaiming_normal_(layer.weight, a=0.2, nonlinearity="leaky_relu")
                    nn.init.normal_(layer.bias, std=0.1)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> SmallFeatureNet:
        """Stay in eval mode whatever is asked (like torchmetrics' Inception)."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"SmallFeatureNet expects images [N, C, H, W], got shape {tuple(x.shape)}")
        weight = self.body[0].weight
        x = x.to(weight.dtype) / 255.0 if x.dtype == torch.uint8 else x.to(weight.dtype)
        if x.shape[1] != self.in_channels:
            if x.shape[1] == 1:
                x = x.expand(-1, self.in_channels, -1, -1)
            else:
                raise ValueError(
                    f"SmallFeatureNet(in_channels={self.in_channels}) got {x.shape[1]}-channel images"
                )
        if x.shape[-2:] != (32, 32):
            x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
        h = self.body(x * 2.0 - 1.0)
        return h.mean(dim=(2, 3))


def inception_available() -> bool:
    """Whether torch-fidelity (needed by torchmetrics' standard Inception network) is installed."""
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    return bool(_TORCH_FIDELITY_AVAILABLE)


def hub_weights_path() -> Path:
    """Where torch hub caches the standard Inception weights (``$TORCH_HOME/hub/checkpoints/``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILENAME


def resolve_inception_weights(
    path: str | os.PathLike | None = None, *, allow_download: bool | None = None
) -> str | None:
    """The weights file of the standard Inception network, or ``None`` when torchmetrics may download it.

    ``path`` given: it must be an existing file. Otherwise torch hub's cache is used when the file is there;
    else ``allow_download`` decides: ``True`` lets torchmetrics download them (returns ``None``); ``False`` or
    ``None`` (the default) raises a ConfigError saying where to put the file. Nothing touches the network
    unless the user asked for a download.
    """
    if path is not None and str(path) != "":
        p = Path(path).expanduser()
        if not p.is_file():
            raise ConfigError(
                f"Inception weights file {p} does not exist: download {INCEPTION_WEIGHTS_URL} and set "
                f"paths.inception_weights=<path to it> (or use a custom feature network, e.g. feature=small)"
            )
        return str(p)
    cached = hub_weights_path()
    if cached.is_file():
        return str(cached)
    if not allow_download:
        raise ConfigError(
            f"The standard Inception weights are not on this machine: set fid.allow_download=true to fetch them, "
            f"or download {INCEPTION_WEIGHTS_URL} elsewhere, copy it here and set paths.inception_weights=<path> "
            f"(or put it at {cached})"
        )
    return None


def _require_fidelity() -> None:
    if not inception_available():
        raise ConfigError(
            "The standard Inception network needs torch-fidelity: run `pip install torch-fidelity` "
            "(or use a custom feature network, e.g. feature=small)"
        )


def _standard_feature(feature: Any) -> int | None:
    """The Inception layer size when ``feature`` names the standard network, else ``None``."""
    if isinstance(feature, bool):
        raise ConfigError(
            f"metrics feature must be one of {INCEPTION_FEATURES}, 'small' or a module, got {feature}"
        )
    if isinstance(feature, int):
        value = feature
    elif isinstance(feature, str):
        name = feature.strip().lower()
        if name in ("inception", "standard"):
            return 2048
        if name.startswith(("inception-", "inception_")):
            name = name[len("inception-") :]
        if not name.isdigit():
            return None
        value = int(name)
    else:
        return None
    if value not in INCEPTION_FEATURES:
        raise ConfigError(
            f"metrics feature={feature} is not an Inception layer: use one of {INCEPTION_FEATURES}, "
            f"'small' or a feature network module"
        )
    return value


def _custom_feature(feature: Any) -> nn.Module:
    if isinstance(feature, nn.Module):
        return feature
    if isinstance(feature, str) and feature.strip().lower() in ("small", "smallfeaturenet"):
        return SmallFeatureNet()
    raise ConfigError(
        f"metrics feature={feature!r} is unknown: use one of {INCEPTION_FEATURES} (standard Inception), "
        f"'small' (SmallFeatureNet) or an nn.Module mapping images to [N, F] features"
    )


def feature_name(feature: Any) -> str:
    """A short name of a feature network for result tables, e.g. ``inception-2048`` or ``SmallFeatureNet-64``."""
    layer = _standard_feature(feature)
    if layer is not None:
        return f"inception-{layer}"
    module = _custom_feature(feature)
    num = getattr(module, "num_features", None)
    return f"{type(module).__name__}-{int(num)}" if num is not None else type(module).__name__


def _wrap_build_errors(fn, *args, weights_file: str | None = None, **kwargs):
    """Run a metric constructor; turn weight loading/download failures into one-line ConfigErrors."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
            return fn(*args, **kwargs)
    except ConfigError:
        raise
    except Exception as err:  # torch.load / load_state_dict / download failures of any kind
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        source = weights_file or f"the download into {hub_weights_path()}"
        raise ConfigError(
            f"Could not load the Inception weights from {source} ({type(err).__name__}: {first}): put "
            f"{INCEPTION_WEIGHTS_URL} on disk and set paths.inception_weights=<path>"
        ) from err


def inception_feature_net(weights: str | None, layer: int = 2048) -> nn.Module:
    """The standard Inception (torchmetrics' ``NoTrainInceptionV3``, torch-fidelity's weights) as a frozen feature
    network: uint8 RGB images [N, 3, H, W] (``images.inception_input``) -> features [N, layer]."""
    _require_fidelity()
    from torchmetrics.image.fid import NoTrainInceptionV3

    return _wrap_build_errors(NoTrainInceptionV3, name="inception-v3-compat", features_list=[str(layer)],
                              feature_extractor_weights_path=weights, weights_file=weights).eval()


def feature_from_config(fid_cfg: Any) -> Any:
    """The feature network named by a ``fid:`` config block: an int/str for the standard Inception
    (``2048``, ``"small"``, ...) or a ``_target_`` mapping that builds any ``nn.Module``."""
    feature = fid_cfg.get("feature", 2048)
    if hasattr(feature, "get") and feature.get("_target_"):
        from hydra.utils import instantiate

        return instantiate(feature)
    return feature
