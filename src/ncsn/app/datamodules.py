"""Lightning DataModules: ``ImageDataModule`` (mnist, cifar10, celeba, mnist_bundled, lsun, ffhq, image_folder)
and ``ToyDataModule``.

``batch_size`` is the GLOBAL batch size: each of the ``trainer.world_size`` processes loads
``batch_size / world_size`` (``per_device_batch_size``), so a run's optimisation does not change with the
number of devices. Lightning adds the DistributedSampler itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from ncsn.data.datasets import (
    DATASET_CHANNELS,
    DEFAULT_IMAGE_SIZE,
    IMAGE_DATASETS,
    build_image_datasets,
    check_dataset_name,
    toy_gmm_datasets,
)
from ncsn.data.folders import FOLDER_CHANNELS
from ncsn.errors import ConfigError


def per_device_batch_size(global_batch_size: int, world_size: int = 1) -> int:
    """The batch each device loads: ``global_batch_size / world_size``, which must be a whole number."""
    global_batch_size, world_size = int(global_batch_size), max(1, int(world_size))
    if global_batch_size < 1:
        raise ConfigError(f"data.batch_size must be a positive integer, got {global_batch_size}")
    if global_batch_size % world_size:
        raise ConfigError(f"data.batch_size {global_batch_size} is not divisible by {world_size} devices; "
                          f"choose a multiple of {world_size}")
    return global_batch_size // world_size


def check_sizes(**sizes: int | None) -> None:
    """Data sizes and counts given as ``data.<name>=value``: each a whole number, >= 1 (``num_workers``: >= 0);
    None means unset."""
    for name, value in sizes.items():
        minimum = 0 if name == "num_workers" else 1
        if value is not None and (isinstance(value, bool) or int(value) != value or value < minimum):
            raise ConfigError(f"data.{name} must be a whole number >= {minimum} (got {value})")


class _BaseDataModule(L.LightningDataModule):
    """Shared loaders; subclasses set ``self.train_set`` / ``self.val_set`` in ``setup``."""

    batch_size: int
    val_batch_size: int | None
    num_workers: int
    pin_memory: bool
    seed: int

    def __init__(self) -> None:
        super().__init__()
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    @property
    def world_size(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1

    def _loader(self, dataset: Dataset, global_batch: int, train: bool) -> DataLoader:
        world = self.world_size
        batch = per_device_batch_size(global_batch, world)
        if train and len(dataset) // world < batch:  # drop_last would leave no batch at all
            raise ConfigError(f"the training set has {len(dataset)} examples, fewer than one batch of {batch} "
                              f"per device on {world} device(s); lower data.batch_size")
        return DataLoader(dataset, batch_size=batch, shuffle=train, drop_last=train,
                          num_workers=self.num_workers, pin_memory=self.pin_memory,
                          persistent_workers=self.num_workers > 0)

    def _ensure_setup(self) -> None:
        if self.train_set is None or self.val_set is None:
            self.setup("fit")

    def train_dataloader(self) -> DataLoader:
        self._ensure_setup()
        return self._loader(self.train_set, self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        self._ensure_setup()
        return self._loader(self.val_set, self.val_batch_size or self.batch_size, train=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def sample_batch(self, n: int) -> torch.Tensor:
        """``min(n, len(train))`` training inputs (a random subset fixed by ``seed``), stacked into a tensor.

        For data statistics such as the largest pairwise distance (sigma_1 of NCSNv2's technique 1).
        """
        self._ensure_setup()
        total = len(self.train_set)
        idx = torch.randperm(total, generator=torch.Generator().manual_seed(self.seed))[: max(0, int(n))]
        return torch.stack([self.train_set[int(i)][0] for i in idx])


class ImageDataModule(_BaseDataModule):
    """An image dataset (``name``: mnist, cifar10, celeba, mnist_bundled, lsun, ffhq, image_folder) as
    model-range [0, 1] tensors.

    ``image_size`` / ``channels`` (None: the dataset's own) are what the model config reads; ``channels`` must
    match the dataset (image_folder: 1 or 3, the files are converted). ``val_size`` is for mnist_bundled only;
    ``verify_checksums`` for cifar10 only; ``center_crop`` is applied before resizing (140 for CelebA in the
    paper). ``path`` is the folder of lsun / ffhq (default ``data_dir/lsun``, ``data_dir/ffhq``) and
    image_folder (required); ``category`` the LSUN category; ``resize`` and ``val_fraction`` are for ffhq and
    image_folder (``ncsn.data.folders``). ``val_batch_size`` (global) defaults to ``batch_size``. ``download``
    fetches MNIST / CIFAR-10 in ``prepare_data`` (the others: never).
    """

    def __init__(self, name: str, data_dir: str | Path = "data", batch_size: int = 128, num_workers: int = 0,
                 pin_memory: bool = False, download: bool = False, image_size: int | None = None,
                 channels: int | None = None, random_flip: bool = False, center_crop: int | None = None,
                 verify_checksums: bool = True, val_size: int = 500, val_batch_size: int | None = None,
                 seed: int = 0, path: str | Path | None = None, category: str | None = None, resize: bool = True,
                 val_fraction: float = 0.1) -> None:
        super().__init__()
        if name == "toy_gmm":
            raise ConfigError("toy_gmm is served by ncsn.app.datamodules.ToyDataModule; use data=toy_gmm")
        self.name = check_dataset_name(name, IMAGE_DATASETS)
        native = DATASET_CHANNELS[name]
        if name == "image_folder" and channels is not None:
            if int(channels) not in FOLDER_CHANNELS:
                raise ConfigError(f"data.channels={channels}: an image folder is read as 1 (grey) or 3 (RGB) "
                                  "channels")
            native = int(channels)
        if channels is not None and int(channels) != native:
            raise ConfigError(f"data.channels={channels} but {name} images have {native} channel(s); "
                              f"set data.channels={native}")
        if image_size is not None and int(image_size) < 1:
            raise ConfigError(f"data.image_size must be a positive integer, got {image_size}")
        check_sizes(num_workers=num_workers, val_batch_size=val_batch_size, center_crop=center_crop)
        self.data_dir = str(data_dir)
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size) if val_batch_size else None
        per_device_batch_size(self.batch_size)  # reject non-positive sizes now
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.download = bool(download)
        self._image_size = int(image_size or DEFAULT_IMAGE_SIZE[name])
        self._channels = native
        self.random_flip = bool(random_flip)
        self.center_crop = int(center_crop) if center_crop else None
        self.verify_checksums = bool(verify_checksums)
        self.val_size = int(val_size)
        self.path = str(path) if path else None
        self.category = str(category) if category else None
        self.resize = bool(resize)
        self.val_fraction = float(val_fraction)
        self.seed = int(seed)
        self.save_hyperparameters(logger=False)  # in checkpoints; the loggers get the nested run config

    @property
    def channels(self) -> int:
        return self._channels

    @property
    def image_size(self) -> int:
        return self._image_size

    @property
    def data_shape(self) -> tuple[int, int, int]:
        return (self._channels, self._image_size, self._image_size)

    def _build(self, download: bool) -> tuple[Dataset, Dataset]:
        return build_image_datasets(self.name, self.data_dir, image_size=self._image_size,
                                    random_flip=self.random_flip, center_crop=self.center_crop,
                                    download=download, verify_checksums=self.verify_checksums,
                                    val_size=self.val_size, path=self.path, category=self.category,
                                    channels=self._channels, resize=self.resize, val_fraction=self.val_fraction)

    def prepare_data(self) -> None:
        """Download (rank 0 only, Lightning's contract) when ``download`` and the dataset supports it."""
        if self.download and self.name in ("mnist", "cifar10"):
            self._build(download=True)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None or self.val_set is None:
            # download=True here is a no-op after prepare_data; it lets setup() alone work (sample.py).
            self.train_set, self.val_set = self._build(download=self.download)


class ToyDataModule(_BaseDataModule):
    """Samples of the paper's 2-D mixture ``1/5 N((-5,-5), I) + 4/5 N((5,5), I)``: batches ``(x [B, 2], k [B])``."""

    name = "toy_gmm"

    def __init__(self, n_train: int = 10000, n_val: int = 2000, batch_size: int = 128, seed: int = 0,
                 num_workers: int = 0, pin_memory: bool = False, val_batch_size: int | None = None) -> None:
        super().__init__()
        check_sizes(n_train=n_train, n_val=n_val, num_workers=num_workers, val_batch_size=val_batch_size)
        self.n_train, self.n_val = int(n_train), int(n_val)
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size) if val_batch_size else None
        per_device_batch_size(self.batch_size)
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.save_hyperparameters(logger=False)  # in checkpoints; the loggers get the nested run config

    @property
    def dim(self) -> int:
        return 2

    @property
    def data_shape(self) -> tuple[int]:
        return (2,)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None or self.val_set is None:
            self.train_set, self.val_set = toy_gmm_datasets(self.n_train, self.n_val, self.seed)

    def sample_batch(self, n: int) -> torch.Tensor:
        self._ensure_setup()
        return self.train_set.tensors[0][: max(0, int(n))].clone()  # already i.i.d.



def quality_metric_for_data(
    data: str | Mapping | Any,
    *,
    num_samples: int,
    device: str | torch.device | None = None,
    inception_weights: str | Path | None = None,
    data_dir: str | Path | None = None,
) -> Any:
    """``ncsn.metrics.quality_metric_for`` (a ``SampleQuality``, or None) from a data config (a ``data:`` node
    with ``_target_``, or a mapping with ``name``)
    or a dataset name (``mnist_bundled``, ``toy_gmm``, ``cifar10``, ...; ``data_dir`` for the files). Unknown
    names give None. Nothing is downloaded.

    A data config builds the datamodule from ALL its fields, as training does (CelebA's ``center_crop``, the
    ``image_size``, ``random_flip`` for the floor, ...); a name alone gets the datamodule's defaults, which are
    not the config group's (``python -m ncsn.metrics score`` composes the group, ``ncsn.tools.score``)."""
    from ncsn.metrics.quality import quality_metric_for
    from ncsn.metrics.registry import data_fields, quality_kind

    cfg = data_fields(data)
    kind = quality_kind(cfg, inception_weights=inception_weights)
    if kind is None:
        return None
    if kind == "toy":
        return quality_metric_for(ToyDataModule(), num_samples=num_samples, device=device)
    kwargs = {k: v for k, v in cfg.items() if k not in ("_target_", "download")}
    if data_dir is not None:
        kwargs["data_dir"] = str(data_dir)
    return quality_metric_for(ImageDataModule(**kwargs, download=False), num_samples=num_samples, device=device,
                              inception_weights=inception_weights)


__all__ = ["DEFAULT_IMAGE_SIZE", "ImageDataModule", "ToyDataModule", "per_device_batch_size", "quality_metric_for_data"]
