"""Tiny datasets written in each dataset's REAL on-disk format, read back through the code users run."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import Timer
from PIL import Image

from ncsn.app.datamodules import ImageDataModule
from ncsn.data.transforms import image_transform

CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def write_idx(path: Path, arr: np.ndarray) -> None:
    """IDX file: big-endian magic 0x0000080N (uint8, N dims; 2051 images, 2049 labels), N dims, raw bytes."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    path.write_bytes(struct.pack(">I", 0x0800 | arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
                     + arr.tobytes())


def write_mnist(root: Path, n_train: int = 8, n_test: int = 4, seed: int = 0) -> dict:
    """``root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` as torchvision expects them."""
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    data = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(raw / f"{split}-images-idx3-ubyte", images)
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels)
        data[split] = (images, labels)
    return data


def write_cifar(root: Path, key_type=bytes, per_batch: int = 2, n_test: int = 3, seed: int = 1) -> dict:
    """The python-version batches: pickled dicts with data uint8 [N, 3072] (R, G, B planes) and labels."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def key(s):
        return s.encode() if key_type is bytes else s

    rng = np.random.default_rng(seed)
    out = {}
    for name, n in [*((f"data_batch_{i}", per_batch) for i in range(1, 6)), ("test_batch", n_test)]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        batch = {key("batch_label"): key(name), key("labels"): labels, key("data"): data,
                 key("filenames"): [key(f"img_{j}.png") for j in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        out[name] = (data, labels)
    meta = {key("label_names"): [key(c) for c in CIFAR_CLASSES], key("num_cases_per_batch"): per_batch,
            key("num_vis"): 3072}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return out


def write_celeba(root: Path, partitions: list[int], seed: int = 2) -> Path:
    """``root/celeba/img_align_celeba/NNNNNN.jpg`` (178 x 218 like the real aligned images) and
    ``root/celeba/list_eval_partition.txt`` (0 train, 1 valid, 2 test)."""
    folder = Path(root) / "celeba"
    img_dir = folder / "img_align_celeba"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(1, len(partitions) + 1):
        pixels = rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(img_dir / f"{i:06d}.jpg", quality=90)
    (folder / "list_eval_partition.txt").write_text(
        "".join(f"{i:06d}.jpg {p}\n" for i, p in enumerate(partitions, 1))
    )
    return folder


def write_lsun(root: Path, category: str = "church_outdoor", n_train: int = 5, n_val: int = 3, seed: int = 3
               ) -> dict[str, dict[bytes, np.ndarray]]:
    """``root/<category>_{train,val}_lmdb`` as LSUN releases them (and torchvision's ``LSUNClass`` reads them):
    lmdb databases whose keys are 40-hex-digit ids and whose values are WebP-encoded RGB images (lossless here,
    so the pixels can be compared), of varied non-square sizes like the real ones (short side 256 there).
    Returns {split: {key: uint8 [H, W, 3]}}."""
    import hashlib
    import io

    import lmdb

    rng = np.random.default_rng(seed)
    Path(root).mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("val", n_val)):
        images = {}
        env = lmdb.open(str(Path(root) / f"{category}_{split}_lmdb"), map_size=1 << 24)
        with env.begin(write=True) as txn:
            for i in range(n):
                h, w = (24, 36) if i % 2 else (40, 30)
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, format="webp", lossless=True)
                key = hashlib.sha1(f"{category}{split}{i}".encode()).hexdigest().encode()
                txn.put(key, buffer.getvalue())
                images[key] = pixels
        env.close()
        out[split] = images
    return out


def write_ffhq(root: Path, n: int = 20, size: int = 48, seed: int = 4) -> list[Path]:
    """``root/images1024x1024/<thousands>/<index>.png`` as FFHQ releases them (smaller: ``size`` square, 10 images
    a subfolder instead of 1,000). Returns the files in index order."""
    rng = np.random.default_rng(seed)
    files = []
    for i in range(n):
        path = Path(root) / "images1024x1024" / f"{i // 10 * 10:05d}" / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        files.append(path)
    return files


def write_image_folder(root: Path, seed: int = 5) -> dict[str, np.ndarray]:
    """A user's folder: RGB PNGs, grey JPEGs, RGBA WebPs of several sizes in nested subfolders, plus files that are
    not images or are hidden (skipped). Returns {relative path: the pixels written} of the images."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    specs = [("a/red.png", (30, 40, 3), "png"), ("a/b/grey.jpg", (50, 50), "jpeg"),
             ("c/alpha.webp", (64, 64, 4), "webp"), ("d.PNG", (20, 20, 3), "png"),
             ("e.jpeg", (35, 25, 3), "jpeg"), ("f.png", (16, 16), "png")]
    written = {}
    for rel, shape, fmt in specs:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        Image.fromarray(pixels).save(path, format=fmt, **({"lossless": True} if fmt == "webp" else {}))
        written[rel] = pixels
    (root / "notes.txt").write_text("not an image\n")
    (root / ".hidden.png").write_bytes(b"not even a png")
    (root / ".thumbnails").mkdir()
    (root / ".thumbnails" / "x.png").write_bytes(b"skipped")
    return written


class WeightsProbe(L.Callback):
    """A callback (``+callbacks.probe={_target_:fakes.WeightsProbe,out_dir:DIR}``, with tests/ on PYTHONPATH)
    that writes, on every rank, the module's and the EMA average's weights at the start of training (after a
    resume's restore) and at its end: ``DIR/{start,end}_rank{R}.pt`` = {"module", "average" (or None), "step"}.
    A module-level class: ``ddp_spawn`` pickles the callbacks."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def _dump(self, trainer, pl_module, when: str) -> None:
        import os

        import torch
        from lightning.pytorch.callbacks import WeightAveraging

        from ncsn.app.lightning_private import average_model

        def copy(state):
            return {k: v.detach().cpu().clone() for k, v in state.items()}

        ema = [c for c in trainer.callbacks if isinstance(c, WeightAveraging)]
        average = average_model(ema[0]).module.state_dict() if ema else None
        state = {"module": copy(pl_module.state_dict()), "average": None if average is None else copy(average),
                 "step": trainer.global_step}
        os.makedirs(self.out_dir, exist_ok=True)
        torch.save(state, os.path.join(self.out_dir, f"{when}_rank{trainer.global_rank}.pt"))

    def on_train_start(self, trainer, pl_module) -> None:
        self._dump(trainer, pl_module, "start")

    def on_train_end(self, trainer, pl_module) -> None:
        self._dump(trainer, pl_module, "end")


def fake_inception_weights(path: Path, monkeypatch) -> None:
    """A randomly initialised Inception state dict in torch-fidelity's format at ``path`` (no download)."""
    import torch
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with monkeypatch.context() as m:
        m.setattr(torch, "load", lambda *a, **k: {})
        m.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="-")
    torch.save(net.state_dict(), path)


class CollectiveCounter(L.Callback):
    """Counts the torch.distributed collectives of each validation (from ``on_validation_epoch_start`` to this
    callback's ``on_validation_end``; ModelCheckpoint saves run after it) and writes, per rank,
    ``DIR/collectives_rank{R}.json`` = [count per validation] and the validation metrics of rank R. A module-level
    class: ``ddp_spawn`` pickles the callbacks."""

    NAMES = ("all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list", "barrier",
             "reduce", "gather", "scatter", "all_to_all")

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.counts: list[int] = []
        self.names: list[list[str]] = []  # the collectives of each validation, by name
        self._counting = False

    def setup(self, trainer, pl_module, stage: str) -> None:
        import functools

        import torch.distributed as dist

        for name in self.NAMES:
            original = getattr(dist, name, None)
            if original is None or getattr(original, "_counted", False):
                continue

            @functools.wraps(original)
            def counted(*args, _original=original, _name=name, **kwargs):
                if self._counting:
                    self.counts[-1] += 1
                    self.names[-1].append(_name)
                return _original(*args, **kwargs)

            counted._counted = True
            setattr(dist, name, counted)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.counts.append(0)
        self.names.append([])
        self._counting = True

    def on_validation_end(self, trainer, pl_module) -> None:
        import json
        import os

        self._counting = False
        os.makedirs(self.out_dir, exist_ok=True)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val")}
        with open(os.path.join(self.out_dir, f"collectives_rank{trainer.global_rank}.json"), "w") as f:
            json.dump({"counts": self.counts, "names": self.names, "metrics": metrics}, f)



class PlainDigits(ImageDataModule):
    """The bundled digits without the validation set's dequantisation noise: validations differ only by what the
    module draws. A module-level class: ``ddp_spawn`` pickles the datamodule."""

    def setup(self, stage=None):
        super().setup(stage)
        self.val_set.transform = image_transform(28, False, False, native_size=28, dequantize=False)


class QualityProbe(L.Callback):
    """Writes, on every rank at the end of training, the ``quality/*`` values in ``trainer.callback_metrics``:
    ``DIR/quality_rank{R}.json``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module) -> None:
        import json
        import os

        os.makedirs(self.out_dir, exist_ok=True)
        values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("quality/")}
        with open(os.path.join(self.out_dir, f"quality_rank{trainer.global_rank}.json"), "w") as f:
            json.dump(values, f)


def parameter_table(path: Path, ngf: int, channels: int, skip: tuple[str, ...] = ()) -> dict[str, tuple[int, ...]]:
    """An official network's parameters (name -> shape, registration order) from a table read off its class: one
    line ``name dim dim ...`` each, dims as numbers, ``C`` (channels), ``ngf`` or ``K*ngf``; ``skip``: name
    prefixes to leave out."""
    def size(dim: str) -> int:
        if dim == "C":
            return channels
        if dim == "ngf":
            return ngf
        if dim.endswith("*ngf"):
            return int(dim[: -len("*ngf")]) * ngf
        return int(dim)

    table = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, *dims = line.split()
            if not (skip and name.startswith(skip)):
                table[name] = tuple(size(d) for d in dims)
    return table


class FixedTimer(Timer):
    """Lightning's Timer for ``max_time`` = ``duration`` with ``left`` seconds remaining (its clock, without the
    waiting)."""

    def __init__(self, left: float, duration: str = "00:00:11:30") -> None:
        super().__init__(duration=duration)
        self.left = left
        self.total = sum(int(part) * unit for part, unit in zip(duration.split(":"), (86400, 3600, 60, 1), strict=True))

    def time_remaining(self, stage="train") -> float:
        return self.left

    def time_elapsed(self, stage="train") -> float:
        return self.total - self.left
