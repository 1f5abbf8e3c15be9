"""LSUN scenes (``data=lsun``): the released lmdb databases ``<path>/<category>_train_lmdb`` and
``<path>/<category>_val_lmdb`` (``path`` defaults to ``data_dir/lsun``; LSUN's ``download.py -c <category>``
fetches them), read as torchvision's LSUN class reads them: every key of a database holds one encoded image (WebP
in the release), opened with Pillow and converted to RGB. Train = the ``train`` database, validation (and the
quality metric's reference) = the ``val`` one (300 images per category), as ermongroup/ncsnv2 splits them.

Read here rather than through torchvision.datasets.LSUN for two reasons: torchvision pickles the key list
to ``_cache_<letters of the path>`` in the current directory (litter in the run's directory, and a stale list
reused when another database later sits at the same path), and it keeps the database open in the parent
process, where DataLoader workers inherit the handle across ``fork`` (py-lmdb then refuses to open the path
again in the worker: "already open in this process"). Here the keys are listed once at setup into one compact
array; a DataLoader worker opens its own read-only handle on first use and keeps it, while the main process
opens the database for each read and closes it again (so no handle exists when workers fork; it reads few
images: the quality metric's reference, the σ helper's sample). Needs the ``lmdb`` package (``pip install
lmdb``, or the ``lsun`` extra).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, get_worker_info

from ncsn.data.transforms import image_transform
from ncsn.errors import DataNotFoundError, UserError

#: the scene categories LSUN releases with train and val databases
LSUN_CATEGORIES = ("bedroom", "bridge", "church_outdoor", "classroom", "conference_room", "dining_room",
                   "kitchen", "living_room", "restaurant", "tower")


def require_lmdb():
    try:
        import lmdb
    except ImportError:
        raise UserError("data=lsun needs the lmdb package: pip install lmdb (or pip install -e '.[lsun]')"
                        ) from None
    return lmdb


def _open(lmdb, root: Path):
    return lmdb.open(str(root), readonly=True, lock=False, readahead=False, meminit=False, max_readers=1)


class LSUNDatabase(Dataset):
    """One LSUN lmdb database as ``(image, 0)`` pairs, in key order (torchvision's order)."""

    def __init__(self, root: str | Path, transform: Callable | None = None) -> None:
        lmdb = require_lmdb()
        self.root = Path(root)
        self.transform = transform
        try:
            env = _open(lmdb, self.root)
        except lmdb.Error as exc:
            raise DataNotFoundError(f"{self.root} is not a readable lmdb database ({str(exc).splitlines()[0]}); "
                                    "unzip LSUN's <category>_<split>_lmdb.zip there again") from exc
        try:
            with env.begin(write=False) as txn:
                keys = list(txn.cursor().iternext(keys=True, values=False))
        finally:
            env.close()
        if not keys:
            raise DataNotFoundError(f"the LSUN database {self.root} is empty; unzip LSUN's "
                                    f"{self.root.name}.zip there again")
        # one fixed-width bytes array: compact (3M bedroom keys: 120 MB, not a list of 3M objects) and shared
        # by forked workers without copies
        self.keys = np.array(keys, dtype=f"S{max(len(k) for k in keys)}")
        self._env = None  # a DataLoader worker's own handle
        self._pid = None

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self) -> dict[str, Any]:  # the handle stays in its process (ddp_spawn pickles datasets)
        return {**self.__dict__, "_env": None, "_pid": None}

    def _get(self, key: bytes) -> bytes | None:
        if get_worker_info() is None:  # the main process: no handle outlives the read (see the module doc)
            env = _open(require_lmdb(), self.root)
            try:
                with env.begin(write=False) as txn:
                    return txn.get(key)
            finally:
                env.close()
        if self._env is None or self._pid != os.getpid():
            self._env, self._pid = _open(require_lmdb(), self.root), os.getpid()
        with self._env.begin(write=False) as txn:
            return txn.get(key)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        key = bytes(self.keys[index])
        data = self._get(key)
        try:
            if data is None:
                raise KeyError("no such key")
            img = Image.open(io.BytesIO(data)).convert("RGB")
        except Exception as exc:  # unidentified, truncated, missing: name the record
            raise DataNotFoundError(f"cannot read the image under key {key.decode(errors='replace')} of "
                                    f"{self.root} ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                                    "unzip the database again") from exc
        return (self.transform(img) if self.transform is not None else img), 0


def lsun_datasets(path: str | Path, category: str | None, *, image_size: int = 64, random_flip: bool = True,
                  center_crop: int | None = None) -> tuple[Dataset, Dataset]:
    """(train, val) of one LSUN category: Resize(image_size) + CenterCrop(image_size), flips in train, as
    ermongroup/ncsnv2 reads LSUN."""
    if not category:
        raise UserError(f"data=lsun needs data.category=<name>, e.g. {', '.join(LSUN_CATEGORIES)}")
    path = Path(path)
    databases = [path / f"{category}_{split}_lmdb" for split in ("train", "val")]
    missing = [str(p) for p in databases if not p.is_dir()]
    if missing:
        known = "" if category in LSUN_CATEGORIES else f" (LSUN's categories: {', '.join(LSUN_CATEGORIES)})"
        raise DataNotFoundError(f"LSUN {category} not found: missing {' and '.join(missing)}; fetch it with "
                                f"LSUN's download.py -c {category} and unzip it in {path}{known}")
    return (LSUNDatabase(databases[0], image_transform(image_size, True, random_flip, center_crop)),
            LSUNDatabase(databases[1], image_transform(image_size, False, random_flip, center_crop)))
