"""Datasets from folders of image files: ``image_folder`` (any folder of your own images) and ``ffhq`` (the
released FFHQ PNGs, ``data_dir/ffhq`` by default; either ``images1024x1024`` or ``thumbnails128x128``).

* Files: every ``.png``, ``.jpg``/``.jpeg`` and ``.webp`` under ``path``, in subfolders too (``ffhq``: ``.png``
  only), suffixes in any case, hidden files and folders skipped, sorted by their path below ``path``.
* Each file's header is read once at setup (Pillow reads the size, not the pixels: ~0.1 ms a file), so a file
  that is not an image stops the run before training with one line naming it; one whose pixels are damaged
  is named when it is read. The sizes found there drive the checks below.
* Colour: ``channels`` 3 converts every file to RGB, 1 to grey (``L``), whatever the files hold.
* Size: ``resize`` (default) centre-crops ``center_crop`` pixels when given, then resizes the short edge to
  ``image_size`` and centre-crops a square (nothing is done to images already ``image_size`` square).
  ``resize=false`` takes the images as they are: all must be ``image_size`` square.
* Split: the files are shuffled with the fixed seed 2019 (NumPy's legacy generator) and the first
  ``int(N * (1 - val_fraction))`` train; the rest are held out (validation loss and the quality metric's
  reference). This is how ermongroup/ncsnv2 splits FFHQ, so its 70,000 files with ``val_fraction=0.1`` give the
  official split. The seed is not the run's: the held-out images are the same in every run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ncsn.data.transforms import image_transform
from ncsn.errors import ConfigError, DataNotFoundError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
FFHQ_SUFFIXES = (".png",)
SPLIT_SEED = 2019
#: the channel counts a folder can be read as (``data.channels``)
FOLDER_CHANNELS = {1: "L", 3: "RGB"}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def list_images(root: str | Path, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[Path]:
    """The image files under ``root`` (recursive, hidden entries skipped), sorted by relative path."""
    root = Path(root)
    if not root.exists():
        raise DataNotFoundError(f"image folder {root} does not exist; set data.path=<folder of images>")
    if not root.is_dir():
        raise DataNotFoundError(f"data.path={root} is a file; set data.path to the folder that holds the images")
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(folder) / n for n in names if not n.startswith(".") and n.lower().endswith(tuple(suffixes))]
    if not found:
        raise DataNotFoundError(f"no images ({', '.join(s[1:] for s in suffixes)}) in {root} or its subfolders; "
                                "put the images there or point data.path at their folder")
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def image_sizes(files: Sequence[Path]) -> list[tuple[int, int]]:
    """(width, height) of every file from its header; a file Pillow cannot identify is one error naming it."""
    sizes = []
    for path in files:
        try:
            with Image.open(path) as im:
                sizes.append(im.size)
        except Exception as exc:  # unidentified format, empty or unreadable file, decompression bomb
            raise DataNotFoundError(f"cannot read image {path} ({_first_line(exc)}); delete or replace it"
                                    ) from exc
    return sizes


def split_indices(n: int, val_fraction: float) -> tuple[list[int], list[int]]:
    """(train, held-out) indices of ``n`` files: ermongroup/ncsnv2's FFHQ split (see the module doc)."""
    if not 0.0 < float(val_fraction) < 1.0:
        raise ConfigError(f"data.val_fraction={val_fraction} must be between 0 and 1 (exclusive)")
    indices = list(range(n))
    np.random.RandomState(SPLIT_SEED).shuffle(indices)
    n_train = int(n * (1.0 - float(val_fraction)))
    if n_train < 1 or n_train >= n:
        raise ConfigError(f"{n} images with data.val_fraction={val_fraction} leave {n_train} for training and "
                          f"{n - n_train} held out; both need at least one (add images or change val_fraction)")
    return indices[:n_train], indices[n_train:]


class ImageFiles(Dataset):
    """Image files as ``(image, 0)`` pairs, each converted to ``mode`` (``RGB`` or ``L``) then ``transform``."""

    def __init__(self, files: Sequence[Path], mode: str = "RGB", transform: Callable | None = None) -> None:
        self.files, self.mode, self.transform = list(files), mode, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path = self.files[index]
        try:
            with Image.open(path) as im:
                img = im.convert(self.mode)
        except Exception as exc:  # truncated or damaged pixel data
            raise DataNotFoundError(f"cannot read image {path} ({_first_line(exc)}); delete or replace it"
                                    ) from exc
        return (self.transform(img) if self.transform is not None else img), 0


def _common_size(files: Sequence[Path], sizes: Sequence[tuple[int, int]], root: Path, image_size: int,
                 resize: bool) -> int | None:
    """The side of the images when all are the same square size (so no resize is needed), else None; with
    ``resize`` off, mixed or wrong sizes are one error naming the files."""
    distinct = sorted(set(sizes))
    if not resize:
        if len(distinct) > 1:
            a = files[sizes.index(distinct[0])]
            b = files[sizes.index(distinct[-1])]
            raise ConfigError(
                f"the images in {root} have different sizes ({a.name} is {distinct[0][0]}x{distinct[0][1]}, "
                f"{b.name} is {distinct[-1][0]}x{distinct[-1][1]}) and data.resize=false; set data.resize=true to "
                f"centre-crop and resize them to data.image_size={image_size}")
        (w, h), = distinct
        if (w, h) != (image_size, image_size):
            hint = f"set data.image_size={w} or data.resize=true" if w == h else "set data.resize=true"
            raise ConfigError(f"the images in {root} are {w}x{h}, not data.image_size={image_size} square, and "
                              f"data.resize=false; {hint}")
    if len(distinct) == 1 and distinct[0][0] == distinct[0][1]:
        return distinct[0][0]
    return None


def folder_datasets(path: str | Path, *, image_size: int, channels: int = 3, random_flip: bool = False,
                    center_crop: int | None = None, resize: bool = True, val_fraction: float = 0.1,
                    suffixes: Sequence[str] = IMAGE_SUFFIXES) -> tuple[Dataset, Dataset]:
    """(train, held-out) datasets of the images under ``path`` (see the module doc)."""
    if int(channels) not in FOLDER_CHANNELS:
        raise ConfigError(f"data.channels={channels}: an image folder is read as 1 (grey) or 3 (RGB) channels")
    if center_crop and not resize:
        raise ConfigError("data.center_crop needs data.resize=true (the crop is followed by a resize)")
    root = Path(path)
    files = list_images(root, suffixes)
    if len(files) < 2:
        raise DataNotFoundError(f"{root} holds one image; a run needs at least two (one is held out)")
    native = _common_size(files, image_sizes(files), root, int(image_size), bool(resize))
    train_idx, val_idx = split_indices(len(files), val_fraction)
    mode = FOLDER_CHANNELS[int(channels)]
    return tuple(  # type: ignore[return-value]
        ImageFiles([files[i] for i in idx], mode,
                   image_transform(image_size, train, random_flip, center_crop, native_size=native))
        for idx, train in ((train_idx, True), (val_idx, False)))
