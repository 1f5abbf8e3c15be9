"""Metrics: FID / IS through torchmetrics with an offline feature net, Inception weight handling, FIDCallback.

Nothing here downloads: the standard Inception network is only built from a fake weights file, and only
when torch-fidelity is installed.
"""

import math

import lightning as L
import pytest
import torch
from fakes import fake_inception_weights
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ncsn.app.ema import EMA
from ncsn.app.fid_callback import FIDCallback
from ncsn.app.lightning_private import average_model
from ncsn.errors import ConfigError
from ncsn.metrics import (
    SmallFeatureNet,
    build_fid_metric,
    compute_image_metrics,
    inception_available,
    iter_image_batches,
    resolve_inception_weights,
)


def blobs(n, seed, *, shift=0.0, channels=3, size=32):
    """Structured images in [0, 1]: one soft coloured blob of random place/width/colour, a little noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    centre = torch.rand(n, 2, 1, 1, generator=g)
    width = 0.05 + 0.15 * torch.rand(n, 1, 1, generator=g)
    blob = torch.exp(-((xx - centre[:, 0]) ** 2 + (yy - centre[:, 1]) ** 2) / (2 * width**2))
    colour = 0.3 + 0.7 * torch.rand(n, channels, 1, 1, generator=g)
    x = blob[:, None] * colour + 0.05 * torch.rand(n, channels, size, size, generator=g)
    return (x + shift).clamp(0, 1)


def fid(real, fake, **kw):
    kw.setdefault("feature", SmallFeatureNet())
    return compute_image_metrics(real, fake, inception_score=False, device="cpu", **kw)["fid"]


# ---- FID with the offline feature net ----------------------------------------------------------------------


def test_small_feature_net_is_fixed_and_frozen():
    a, b = SmallFeatureNet(seed=0), SmallFeatureNet(seed=0)
    x = blobs(8, 0)
    assert torch.equal(a(x), b(x))
    assert a(x).shape == (8, 64)
    assert not SmallFeatureNet(seed=1)(x).allclose(a(x))
    a.train()
    assert not a.training and not any(p.requires_grad for p in a.parameters())
    # uint8 input means the same images; grey input is repeated to 3 channels
    assert torch.allclose(a((x * 255).round().to(torch.uint8)), a((x * 255).round() / 255), atol=1e-5)
    grey = blobs(4, 0, channels=1, size=28)
    assert torch.allclose(a(grey), a(grey.expand(-1, 3, -1, -1)), atol=1e-6)


def test_identical_sets_give_zero_and_different_sets_a_large_fid():
    real = blobs(200, 0)
    same = fid(real, real.clone())
    # Exact zero up to float64 round-off in the covariance square root (about 1e-13 here); the FIDs of
    # different sets below are of order 1-30 with this net, so 1e-3 separates them by > 1000x.
    assert abs(same) < 1e-3
    noise = fid(real, torch.rand(200, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    assert noise > 5.0 and noise > 1000 * max(abs(same), 1e-6)
    dark = fid(real, real * 0.2)
    assert dark > 0.5


def test_fid_grows_with_the_shift_and_is_roughly_symmetric():
    real = blobs(200, 0)
    small = fid(real, blobs(200, 1, shift=0.05))
    large = fid(real, blobs(200, 1, shift=0.2))
    same_distribution = fid(real, blobs(200, 1))
    assert same_distribution < small < large
    assert large > 5 * small
    reverse = fid(blobs(200, 1, shift=0.2), real)
    assert reverse == pytest.approx(large, rel=1e-3)


def test_grey_28x28_images_and_a_dataloader_of_labelled_batches():
    real = blobs(120, 0, channels=1, size=28)
    labels = torch.zeros(120, dtype=torch.long)
    loader = DataLoader(TensorDataset(real, labels), batch_size=32)
    out = compute_image_metrics(
        loader, real.clone(), feature="small", batch_size=50, device="cpu", inception_score=False
    )
    assert out["num_real"] == 120 and out["num_fake"] == 120
    assert abs(out["fid"]) < 1e-3
    assert out["feature"] == "SmallFeatureNet-64"
    assert out["is_mean"] is None and out["is_std"] is None
    bright = compute_image_metrics(loader, (real + 0.5).clamp(0, 1), feature=SmallFeatureNet(in_channels=1))
    assert bright["fid"] > 1.0
    capped = compute_image_metrics(loader, real, feature="small", max_real=50, max_fake=70, device="cpu")
    assert (capped["num_real"], capped["num_fake"]) == (50, 70)


def test_iter_image_batches_rechunks_and_limits():
    x = torch.rand(10, 3, 4, 4)
    sizes = [b.shape[0] for b in iter_image_batches([(x, None), x[:3]], batch_size=4, limit=12)]
    assert sizes == [4, 4, 2, 2]
    with pytest.raises(ConfigError):
        list(iter_image_batches(["not an image"], batch_size=4))


# ---- Inception Score with a custom classifier ----------------------------------------------------------------


class BucketClassifier(nn.Module):
    """Confident 'classifier': the class is the bucket of the mean intensity (num_classes equal buckets)."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x):
        bucket = (x.float().mean(dim=(1, 2, 3)) * self.num_classes).long().clamp(0, self.num_classes - 1)
        return nn.functional.one_hot(bucket, self.num_classes).float() * 50.0


def constant_images(levels, repeats):
    values = torch.tensor(levels).repeat_interleave(repeats)
    return values[:, None, None, None].expand(-1, 3, 8, 8).clone()


def test_inception_score_of_a_confident_classifier():
    real = blobs(50, 0, size=8)
    k = 5
    one_class = constant_images([0.5], 500)
    out = compute_image_metrics(
        real, one_class, feature="small", is_feature=BucketClassifier(k), device="cpu"
    )
    assert out["is_mean"] == pytest.approx(1.0, abs=1e-3)
    spread = constant_images([(i + 0.5) / k for i in range(k)], 200)  # 200 images in each class
    whole = compute_image_metrics(
        real, spread, feature="small", is_feature=BucketClassifier(k), splits=1, device="cpu"
    )
    assert whole["is_mean"] == pytest.approx(k, rel=1e-3)
    split = compute_image_metrics(real, spread, feature="small", is_feature=BucketClassifier(k), device="cpu")
    assert 0.9 * k < split["is_mean"] <= k + 1e-3 and split["is_std"] < 0.5
    # no classifier for a custom feature net: IS is skipped
    assert compute_image_metrics(real, spread, feature="small", device="cpu")["is_mean"] is None


# ---- standard Inception: weights on disk, never a download ----------------------------------------------------


def test_missing_inception_weights_file_is_a_one_line_config_error(tmp_path):
    missing = tmp_path / "nope" / "inception.pth"
    with pytest.raises(ConfigError) as err:
        compute_image_metrics(blobs(4, 0), blobs(4, 1), feature=2048, inception_weights=str(missing))
    message = str(err.value)
    assert "\n" not in message and str(missing) in message and "paths.inception_weights=" in message
    with pytest.raises(ConfigError):
        build_fid_metric(2048, inception_weights=missing)


def test_offline_without_weights_says_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(ConfigError) as err:
        resolve_inception_weights(None, allow_download=False)
    message = str(err.value)
    assert "\n" not in message and "paths.inception_weights=" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    # a file in torch hub's cache is found without any configuration
    cached = tmp_path / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    assert resolve_inception_weights(None, allow_download=False) == str(cached)


@pytest.mark.parametrize("bad", [100, "inception-99", "resnet", True])
def test_unknown_feature_is_a_config_error(bad):
    with pytest.raises(ConfigError):
        build_fid_metric(bad)


@pytest.mark.skipif(not inception_available(), reason="torch-fidelity is not installed")
def test_standard_inception_from_a_weights_file_takes_grey_28x28_images(tmp_path, monkeypatch):
    weights = tmp_path / "inception.pth"
    fake_inception_weights(weights, monkeypatch)
    grey = blobs(4, 0, channels=1, size=28)
    out = compute_image_metrics(
        grey,
        blobs(4, 1, channels=1, size=28),
        feature=64,
        inception_weights=weights,
        splits=2,
        device="cpu",
        batch_size=2,
    )
    assert math.isfinite(out["fid"]) and out["feature"] == "inception-64"
    assert out["is_mean"] is not None and math.isfinite(out["is_mean"])
    assert (out["num_real"], out["num_fake"]) == (4, 4)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="paths.inception_weights="):
        build_fid_metric(64, inception_weights=garbage)


# ---- the Lightning callback ---------------------------------------------------------------------------------


class TinyModel(L.LightningModule):
    """One parameter; ``sample`` draws blobs brightened by the parameter and records the value it used."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.3))
        self.sampled_with: list[float] = []
        self.trained_with: list[float] = []
        self.sample_kwargs: list[dict] = []

    def training_step(self, batch, batch_idx):
        self.trained_with.append(float(self.w.detach()))
        return (self.w - 1.0) ** 2 + 0 * batch[0].sum()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", (self.w - 1.0) ** 2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def sample(self, n, *, generator=None, **kwargs):
        self.sampled_with.append(float(self.w.detach()))
        self.sample_kwargs.append(kwargs)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=self.device))
        return blobs(n, seed, shift=float(self.w) - 0.3, size=16).to(self.device)


class TinyData(L.LightningDataModule):
    def __init__(self):
        super().__init__()
        self.images = blobs(64, 123, size=16)
        self.labels = torch.zeros(64, dtype=torch.long)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.images, self.labels), batch_size=8)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.images, self.labels), batch_size=16)


def fit(callbacks, **trainer_kw):
    model, data = TinyModel(), TinyData()
    kw = {
        "max_steps": 4,
        "limit_val_batches": 2,
        "val_check_interval": 2,
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        **trainer_kw,
    }
    trainer = L.Trainer(callbacks=callbacks, **kw)
    trainer.fit(model, datamodule=data)
    return trainer, model


def test_fid_callback_logs_a_finite_val_fid():
    cb = FIDCallback(
        every_n_steps=2,
        num_samples=40,
        num_real=48,
        batch_size=16,
        feature=SmallFeatureNet(),
        seed=0,
        sampler={"n_steps_each": 3},
    )
    trainer, model = fit([cb])
    value = trainer.callback_metrics["val/fid"]
    assert torch.isfinite(value)
    assert [step for step, _ in cb.history] == [2, 4]
    assert all(math.isfinite(v) for _, v in cb.history)
    assert model.sample_kwargs[0] == {"n_steps_each": 3}
    assert len(model.sample_kwargs) == 2 * 3  # 40 samples in chunks of 16, at steps 2 and 4
    assert cb._num_real_seen == 48


def test_fid_callback_feeds_model_checkpoint(tmp_path):
    cb = FIDCallback(every_n_steps=2, num_samples=32, num_real=32, batch_size=32, feature="small")
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val/fid", mode="min", save_top_k=1)
    fit([cb, ckpt], enable_checkpointing=True)
    assert ckpt.best_model_path and ckpt.best_model_score is not None
    assert float(ckpt.best_model_score) == pytest.approx(min(v for _, v in cb.history), rel=1e-5)


def test_fid_callback_cadence_and_first_validation():
    cb = FIDCallback(every_n_steps=4, num_samples=16, num_real=16, batch_size=16, feature="small")
    fit([cb], max_steps=6)  # validations at steps 2, 4, 6
    assert [step for step, _ in cb.history] == [2, 6]
    late = FIDCallback(
        every_n_steps=4,
        num_samples=16,
        num_real=16,
        batch_size=16,
        feature="small",
        on_first_validation=False,
    )
    fit([late], max_steps=6)
    assert [step for step, _ in late.history] == [4]


# TinyModel's w (SGD 0.1 on (w - 1)²): 0.3 at the start, then after 1, 2 and 4 steps
W_AFTER = {1: 0.44, 2: 0.552, 4: 0.71328}


@pytest.mark.parametrize("ema_first", [True, False])
def test_fid_callback_samples_the_ema_average_without_swapping_whatever_the_callback_order(ema_first):
    """ncsn.app.ema.EMA with decay 1 keeps the first update (w after step 1) as its average: FID samples come from
    that averaged model; the module, holding the raw weights throughout, never samples and never holds it."""
    cb = FIDCallback(every_n_steps=2, num_samples=16, num_real=16, batch_size=16, feature="small")
    ema = EMA(decay=1.0)
    _, model = fit([ema, cb] if ema_first else [cb, ema])
    assert average_model(ema).module.sampled_with == pytest.approx([W_AFTER[1], W_AFTER[1]])
    assert model.sampled_with == []  # nothing was swapped into the module for sampling
    assert model.trained_with[2] == pytest.approx(W_AFTER[2])  # the step after a validation: still raw weights


@pytest.mark.parametrize("ema_first", [True, False])
def test_fid_callback_samples_the_raw_weights_before_the_ema_starts(ema_first):
    cb = FIDCallback(every_n_steps=2, num_samples=16, num_real=16, batch_size=16, feature="small")
    ema = EMA(decay=0.5, update_starting_at_step=1000)
    _, model = fit([ema, cb] if ema_first else [cb, ema])
    assert model.sampled_with == pytest.approx([W_AFTER[2], W_AFTER[4]])  # not the initial network's 0.3
    assert average_model(ema).module.sampled_with == []


def test_fid_callback_rejects_bad_settings():
    with pytest.raises(ConfigError):
        FIDCallback(num_samples=1)
    with pytest.raises(ConfigError):
        FIDCallback(feature="resnet")
