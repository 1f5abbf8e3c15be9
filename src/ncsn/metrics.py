"""Sample-quality metrics: FID and Inception Score (through torchmetrics), and a Lightning callback.

Images are model-range tensors: float in [0, 1], shape [N, C, H, W] with C = 1 or 3 (values outside
[0, 1] are clamped). Grey images are repeated to 3 channels for the standard Inception network, which
resizes every image to 299x299 itself (so 28x28 MNIST and 32x32 CIFAR-10 work as they are).

Feature networks (``feature=``):

* the standard Inception-v3 of the FID paper (the TF weights converted by torch-fidelity): ``2048``
  (the pool features used for published FIDs), or ``64``, ``192``, ``768`` (earlier layers, for quick
  checks on few samples). It needs the ``torch-fidelity`` package and its weights file
  ``weights-inception-2015-12-05-6726825d.pth`` (``INCEPTION_WEIGHTS_URL``, about 100 MB). Weights are
  looked up, in order: the path given (config ``fid.inception_weights=<path>``), then torch hub's
  cache (``$TORCH_HOME/hub/checkpoints/``); a download happens only when asked for
  (``allow_download=True``, config ``fid.allow_download=true``). Otherwise a missing file is a one-line
  ``ConfigError`` saying which file to put where: nothing probes the network. Images are quantised to uint8 with
  rounding (``round(255 x)``, like saving a PNG) and resized the TF1 way (``antialias=False``), as the
  reference implementations do; torchmetrics' own ``normalize=True`` truncates instead, which moves real
  images stored as uint8 down by one grey level.
* ``"small"``: ``SmallFeatureNet()``, a tiny fixed random conv net: works offline and in tests, and is
  fine for tracking one run's progress, but its numbers mean nothing next to published FIDs.
* any ``nn.Module`` mapping float images in [0, 1] (the channels as given) to features [N, F]; give it a
  ``num_features`` attribute, or torchmetrics runs a dummy [1, 3, 299, 299] image through it to find F.

Inception Score needs class logits: with the standard Inception it uses the Inception's own 1008-way
logits (``logits_unbiased``, as torch-fidelity); with a custom feature network it is computed only when
``is_feature=<module returning logits [N, num_classes]>`` is given, otherwise it is ``None``.

How to read the numbers: papers report FID between 50,000 samples and the training set (NCSN, Song & Ermon
2019: CIFAR-10 FID 25.32, IS 8.87 with 50k samples). FID estimated from fewer samples is biased upward
(by roughly a constant over N, and much more once N falls below the feature dimension, 2048, where the
covariance is singular), so a 1,000-sample FID logged during training is higher than the 50k one. FIDs are
comparable only at the same sample counts (real and fake), the same feature network (and weights), and the
same reference set; IS likewise at the same sample count and number of splits.

``FIDCallback`` logs ``val/fid`` during training (see its docstring for EMA and multi-GPU behaviour).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore

from ncsn.errors import ConfigError

try:  # the project's own clamp to the image range, when the data package is there
    from ncsn.data.transforms import to_image_range
except ImportError:  # pragma: no cover - fallback with the same meaning

    def to_image_range(x: torch.Tensor) -> torch.Tensor:
        return x.clamp(0.0, 1.0)


__all__ = [
    "INCEPTION_FEATURES",
    "INCEPTION_WEIGHTS_FILENAME",
    "INCEPTION_WEIGHTS_URL",
    "FIDCallback",
    "SmallFeatureNet",
    "build_fid_metric",
    "build_inception_score_metric",
    "compute_image_metrics",
    "feature_name",
    "inception_available",
    "iter_image_batches",
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


def _hub_weights_path() -> Path:
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
                f"fid.inception_weights=<path to it> (or use a custom feature network, e.g. feature=small)"
            )
        return str(p)
    cached = _hub_weights_path()
    if cached.is_file():
        return str(cached)
    if not allow_download:
        raise ConfigError(
            f"The standard Inception weights are not on this machine: set fid.allow_download=true to fetch them, or download "
            f"{INCEPTION_WEIGHTS_URL} elsewhere, copy it here and set fid.inception_weights=<path> "
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
        source = weights_file or f"the download into {_hub_weights_path()}"
        raise ConfigError(
            f"Could not load the Inception weights from {source} ({type(err).__name__}: {first}): put "
            f"{INCEPTION_WEIGHTS_URL} on disk and set fid.inception_weights=<path>"
        ) from err


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
    x = images.detach().to(device)
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    x = to_image_range(x.float())
    if not standard:
        return x
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] != 3:
        raise ConfigError(f"the Inception network takes 1- or 3-channel images, got {x.shape[1]} channels")
    return (x * 255.0).round_().to(torch.uint8)


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


def _default_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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
    dev = _default_device(device)
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


# --------------------------------------------------------------------------------------------------------
# Lightning callback
# --------------------------------------------------------------------------------------------------------


class FIDCallback(L.Callback):
    """Log ``val/fid`` from samples of the model, during training.

    At the end of a validation epoch (not the sanity check) that comes at least ``every_n_steps`` training
    steps after the last FID (and at the first validation when ``on_first_validation``; ``every_n_steps <= 0``:
    every validation), rank zero draws ``num_samples`` images with
    ``pl_module.sample(batch, generator=torch.Generator(device).manual_seed(seed), **sampler)`` in chunks of
    ``batch_size``, takes ``num_real`` real images from ``trainer.datamodule.val_dataloader()`` (their
    features are computed once and cached), computes FID with ``feature``, broadcasts it to every rank and
    logs it as ``val/fid`` (on every rank, same value), so ``ModelCheckpoint(monitor="val/fid", mode="min")``
    works. ``self.history`` keeps ``(global_step, fid)``.

    EMA: Lightning's ``WeightAveraging`` (EMA) swaps the averaged weights into ``pl_module`` in its
    ``on_validation_epoch_start`` and swaps them back in its ``on_validation_epoch_end``; hooks run in the
    order of ``trainer.callbacks``. If the averaging callback comes after this one, the EMA weights are still
    in ``pl_module`` here; if it comes before, it has already swapped back, so this callback swaps them in
    again (the same ``_swap_models``) around sampling. Either way samples come from the EMA weights.

    Notes: ``trainer.callback_metrics`` keeps the last ``val/fid`` across validations where no FID is due, so
    with ``ModelCheckpoint(monitor="val/fid")`` either validate at the FID cadence (``every_n_steps=0``) or
    keep ``save_top_k=1``; the first validation computes FID by default because ModelCheckpoint raises when
    the monitored key is missing after validation has run. Other ranks wait in the broadcast while rank zero
    samples: keep the FID cost under the process group timeout (30 min by default). Rank zero samples with
    the plain LightningModule, so sharded strategies (FSDP, DeepSpeed stage 3) are not supported.

    ``at_train_end``: compute a last FID at the end of training (EMA weights) and send it to the loggers
    (Lightning allows no ``self.log`` there, so ModelCheckpoint doesn't see it).
    """

    def __init__(
        self,
        every_n_steps: int = 5000,
        num_samples: int = 1000,
        num_real: int = 1000,
        batch_size: int = 250,
        feature: int | str | nn.Module = 2048,
        inception_weights: str | os.PathLike | None = None,
        seed: int = 0,
        sampler: dict | None = None,
        on_first_validation: bool = True,
        at_train_end: bool = False,
        allow_download: bool | None = None,
        prog_bar: bool = True,
        name: str = "val/fid",
    ) -> None:
        for key, value in (("num_samples", num_samples), ("num_real", num_real), ("batch_size", batch_size)):
            if int(value) < 1 or (key != "batch_size" and int(value) < 2):
                raise ConfigError(
                    f"FIDCallback {key} must be >= {1 if key == 'batch_size' else 2}, got {value}"
                )
        if not isinstance(feature, nn.Module) and _standard_feature(feature) is None:
            _custom_feature(feature)  # a bad feature name fails here, not at the first validation
        self.every_n_steps = int(every_n_steps)
        self.num_samples = int(num_samples)
        self.num_real = int(num_real)
        self.batch_size = int(batch_size)
        self.feature = feature
        self.inception_weights = inception_weights
        self.seed = int(seed)
        self.sampler = dict(sampler or {})
        self.on_first_validation = on_first_validation
        self.at_train_end = at_train_end
        self.allow_download = allow_download
        self.prog_bar = prog_bar
        self.name = name
        self.history: list[tuple[int, float]] = []
        self.last_fid: float | None = None
        self._last_step: int | None = None
        self._metric: FrechetInceptionDistance | None = None
        self._num_real_seen = 0

    # ---- when -------------------------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._metric = None  # a new fit/validate may bring another validation set: recompute real features
        self._num_real_seen = 0

    def _due(self, step: int) -> bool:
        if self._last_step is None:
            return self.on_first_validation or step >= self.every_n_steps
        return step != self._last_step and step - self._last_step >= self.every_n_steps

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self._due(trainer.global_step):
            return
        value = self._compute_and_broadcast(trainer, pl_module, inside_validation=True)
        pl_module.log(self.name, value, prog_bar=self.prog_bar, sync_dist=trainer.world_size > 1)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.at_train_end or self._last_step == trainer.global_step:
            return
        value = self._compute_and_broadcast(trainer, pl_module, inside_validation=False)
        for logger in trainer.loggers:
            logger.log_metrics({self.name: value}, step=trainer.global_step)

    # ---- how --------------------------------------------------------------------------------------------

    def _compute_and_broadcast(
        self, trainer: L.Trainer, pl_module: L.LightningModule, inside_validation: bool
    ) -> float:
        value = None
        if trainer.is_global_zero:
            value = self.compute_fid(trainer, pl_module, inside_validation=inside_validation)
        value = float(trainer.strategy.broadcast(value, src=0))
        self._last_step = trainer.global_step
        self.last_fid = value
        self.history.append((trainer.global_step, value))
        return value

    def _weight_averaging(self, trainer: L.Trainer) -> WeightAveraging | None:
        for callback in trainer.callbacks:
            if (
                isinstance(callback, WeightAveraging)
                and getattr(callback, "_average_model", None) is not None
            ):
                return callback
        return None

    def _ema_sampler(self, trainer: L.Trainer, pl_module: L.LightningModule, inside_validation: bool):
        """(module to sample with, swap-back function or None): EMA weights when EMA is attached."""
        averaging = self._weight_averaging(trainer)
        if averaging is None:
            return pl_module, None
        callbacks = list(trainer.callbacks)
        swapped_in = (
            inside_validation
            and self in callbacks
            and callbacks.index(averaging) > callbacks.index(self)  # its swap-back hasn't run yet
        )
        if swapped_in:
            return pl_module, None
        averaging._swap_models(pl_module)  # put the EMA weights into pl_module (on its device) for sampling
        return pl_module, lambda: averaging._swap_models(pl_module)

    def _real_source(self, trainer: L.Trainer) -> Any:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "val_dataloader"):
            return datamodule.val_dataloader()
        loaders = trainer.val_dataloaders
        if loaders is None:
            raise ConfigError(
                "FIDCallback needs real images: give the Trainer a datamodule with val_dataloader()"
            )
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0]
        return loaders

    def _fake_batches(self, module: L.LightningModule) -> Iterator[torch.Tensor]:
        generator = torch.Generator(device=module.device).manual_seed(self.seed)
        remaining = self.num_samples
        while remaining > 0:
            n = min(self.batch_size, remaining)
            yield module.sample(n, generator=generator, **self.sampler)
            remaining -= n

    def compute_fid(
        self, trainer: L.Trainer, pl_module: L.LightningModule, inside_validation: bool = True
    ) -> float:
        """FID of ``num_samples`` fresh samples against the cached real features (this process only)."""
        device = pl_module.device
        with torch.inference_mode(), torch.autocast(device_type=device.type, enabled=False):
            if self._metric is None:
                self._metric = build_fid_metric(
                    self.feature,
                    inception_weights=self.inception_weights,
                    allow_download=self.allow_download,
                    reset_real_features=False,
                )
            metric = self._metric.to(device)
            metric.reset()  # fake features only; the real ones are kept
            if self._num_real_seen == 0:
                self._num_real_seen = _feed(
                    [(metric, {"real": True})],
                    self._real_source(trainer),
                    batch_size=self.batch_size,
                    device=device,
                    limit=self.num_real,
                )
                if self._num_real_seen < self.num_real:
                    rank_zero_warn(
                        f"FIDCallback: the validation set has {self._num_real_seen} images, fewer than "
                        f"num_real={self.num_real}; FID uses those"
                    )
            module, restore = self._ema_sampler(trainer, pl_module, inside_validation)
            try:
                _feed(
                    [(metric, {"real": False})],
                    self._fake_batches(module),
                    batch_size=self.batch_size,
                    device=device,
                )
            finally:
                if restore is not None:
                    restore()
            if self._num_real_seen < 2:
                raise ConfigError("FIDCallback needs at least 2 real images from the validation dataloader")
            return float(metric.compute())

    # ---- checkpointing ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step, "history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = state_dict.get("last_step")
        self.history = [tuple(item) for item in state_dict.get("history", [])]
        self.last_fid = self.history[-1][1] if self.history else None


def feature_from_config(fid_cfg: Any) -> Any:
    """The feature network named by a ``fid:`` config block: an int/str for the standard Inception
    (``2048``, ``"small"``, ...) or a ``_target_`` mapping that builds any ``nn.Module``."""
    feature = fid_cfg.get("feature", 2048)
    if hasattr(feature, "get") and feature.get("_target_"):
        from hydra.utils import instantiate

        return instantiate(feature)
    return feature
