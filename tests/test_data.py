"""Data layer: every dataset read from tiny files in its real on-disk format; nothing is ever downloaded."""

import pickle
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fakes import write_cifar, write_idx
from PIL import Image

import ncsn.data.datasets as datasets_mod
from ncsn.app.datamodules import ImageDataModule, ToyDataModule, per_device_batch_size
from ncsn.data import (
    Dequantize,
    build_datasets,
    gmm_log_prob,
    gmm_perturbed_score,
    gmm_sample,
    image_transform,
    to_image_range,
    to_model_range,
    to_uint8,
)
from ncsn.errors import ConfigError, DataNotFoundError

CONF = Path(__file__).resolve().parents[1] / "conf" / "data"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any download attempt fails loudly instead of reaching the network."""

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to download")

    real_connect = socket.socket.connect

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):  # Unix sockets (DataLoader workers) are fine
            raise AssertionError(f"a test tried to open a network connection to {address}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(datasets_mod, "download_and_extract_archive", refuse)


def pixels_match(x: torch.Tensor, pixels: np.ndarray) -> bool:
    """``x`` is the dequantised ``pixels``: ``pixels/256 <= x < (pixels+1)/256``."""
    diff = x - torch.from_numpy(pixels.astype(np.float32)) / 256
    return bool((diff >= -1e-6).all() and (diff < 1 / 256 + 1e-6).all())


# ---------------------------------------------------------------------------------------------- transforms
def test_dequantize_maps_pixel_k_into_its_own_bin():
    torch.manual_seed(0)
    k = torch.arange(256, dtype=torch.float32).repeat(50)
    x = Dequantize()(k / 255)
    assert x.min() >= 0 and x.max() < 1
    assert pixels_match(x, k.numpy())
    assert (x - k / 256).std() > 1e-3  # there is noise
    back = to_uint8(x.view(1, 1, 1, -1)).flatten().float()
    assert (back - k).abs().max() <= 1 and (back == k).float().mean() > 0.999


def test_value_range_helpers():
    x = torch.tensor([[[[-0.5, 0.0], [0.5, 1.5]]]])  # [1, 1, 2, 2]
    assert torch.equal(to_model_range(x), x)
    assert torch.equal(to_image_range(x), x.clamp(0, 1))
    k = torch.arange(256, dtype=torch.float32).view(1, 1, 16, 16).expand(2, 3, 16, 16)
    u8 = to_uint8(k / 255)  # ToTensor's k / 255 maps back exactly
    assert u8.dtype == torch.uint8 and u8.shape == (2, 16, 16, 3)
    assert torch.equal(u8[..., 0].long(), k[:, 0].long())
    assert to_uint8(x).flatten().tolist() == [0, 0, 128, 255]
    assert to_uint8(torch.rand(3, 5, 7)).shape == (5, 7, 3)


def test_image_transform_steps():
    def names(tf):
        return [type(t).__name__ for t in tf.transforms]

    assert names(image_transform(28, True, False, native_size=28)) == ["ToTensor", "Dequantize", "ToModelRange"]
    assert names(image_transform(32, True, True, 140)) == [
        "CenterCrop", "Resize", "CenterCrop", "RandomHorizontalFlip", "ToTensor", "Dequantize", "ToModelRange"]
    assert "RandomHorizontalFlip" not in names(image_transform(32, False, True, 140))


# ---------------------------------------------------------------------------------------------- MNIST
@pytest.fixture
def mnist_dir(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    data = {}
    for split, n in (("train", 8), ("t10k", 4)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(raw / f"{split}-images-idx3-ubyte", images)
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels)
        data[split] = (images, labels)
    assert (raw / "train-images-idx3-ubyte").read_bytes()[:4] == (2051).to_bytes(4, "big")
    assert (raw / "train-labels-idx1-ubyte").read_bytes()[:4] == (2049).to_bytes(4, "big")
    return tmp_path, data


def test_mnist_reads_idx_files(mnist_dir):
    root, data = mnist_dir
    dm = ImageDataModule("mnist", data_dir=root, batch_size=4, val_batch_size=3, image_size=28, channels=1)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (8, 4)  # validation = the official test split
    assert (dm.channels, dm.image_size) == (1, 28)
    for i in range(8):
        x, y = dm.train_set[i]
        assert x.shape == (1, 28, 28) and y == data["train"][1][i]
        assert pixels_match(x[0], data["train"][0][i])
    x, y = dm.val_set[3]
    assert pixels_match(x[0], data["t10k"][0][3]) and y == data["t10k"][1][3]
    train = list(dm.train_dataloader())
    assert [b[0].shape for b in train] == [(4, 1, 28, 28)] * 2
    assert [b[0].shape[0] for b in dm.val_dataloader()] == [3, 1]  # no drop_last, no shuffle
    assert dm.sample_batch(5).shape == (5, 1, 28, 28) and dm.sample_batch(100).shape[0] == 8
    assert dm.test_dataloader().dataset is dm.val_set


def test_mnist_resize_and_channel_check(mnist_dir):
    root, _ = mnist_dir
    dm = ImageDataModule("mnist", data_dir=root, batch_size=4, image_size=32)
    dm.setup()
    x = next(iter(dm.train_dataloader()))[0]
    assert x.shape == (4, 1, 32, 32) and x.min() >= 0 and x.max() <= 1
    with pytest.raises(ConfigError, match="data.channels=1"):
        ImageDataModule("mnist", data_dir=root, channels=3)


def test_missing_mnist_says_where_to_put_it(tmp_path):
    dm = ImageDataModule("mnist", data_dir=tmp_path, download=False)
    with pytest.raises(DataNotFoundError) as err:
        dm.setup()
    msg = str(err.value)
    assert str(tmp_path / "MNIST" / "raw") in msg and "train-images-idx3-ubyte" in msg
    assert "data.download=true" in msg and "\n" not in msg


def test_corrupt_mnist_file_is_a_clear_error(mnist_dir):
    root, _ = mnist_dir
    (root / "MNIST" / "raw" / "t10k-images-idx3-ubyte").write_bytes(b"not an idx file")
    with pytest.raises(DataNotFoundError, match="not valid IDX files"):
        ImageDataModule("mnist", data_dir=root).setup()


# ---------------------------------------------------------------------------------------------- CIFAR-10
@pytest.mark.parametrize("key_type", [bytes, str])
def test_cifar10_reads_pickled_batches(tmp_path, key_type):
    data = write_cifar(tmp_path, key_type)
    dm = ImageDataModule("cifar10", data_dir=tmp_path, batch_size=5, verify_checksums=False, random_flip=False)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set)) == (10, 3)
    assert dm.train_set.classes[0] == "airplane"
    x, y = dm.train_set[2]  # first image of data_batch_2
    assert x.shape == (3, 32, 32) and y == data["data_batch_2"][1][0]
    assert pixels_match(x, data["data_batch_2"][0][0].reshape(3, 32, 32))
    x, y = dm.val_set[1]
    assert pixels_match(x, data["test_batch"][0][1].reshape(3, 32, 32)) and y == data["test_batch"][1][1]
    assert [b[0].shape for b in dm.train_dataloader()] == [(5, 3, 32, 32)] * 2
    pickle.dumps(dm.train_set)  # workers started with spawn need it


@pytest.mark.parametrize("download", [False, True])
def test_cifar10_checksum_failure_is_clear_and_never_downloads(tmp_path, download, monkeypatch):
    write_cifar(tmp_path)
    calls = []
    monkeypatch.setattr(datasets_mod, "download_and_extract_archive", lambda *a, **k: calls.append(a))
    dm = ImageDataModule("cifar10", data_dir=tmp_path, download=download, verify_checksums=True)
    with pytest.raises(DataNotFoundError, match="md5") as err:
        dm.prepare_data()
        dm.setup()
    assert "data.verify_checksums=false" in str(err.value)
    assert calls == []


def test_missing_cifar10_says_where_to_put_it(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        ImageDataModule("cifar10", data_dir=tmp_path, verify_checksums=False).setup()
    msg = str(err.value)
    assert str(tmp_path / "cifar-10-batches-py") in msg and "data_batch_1" in msg and "data.download=true" in msg


def test_flips_only_in_train(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(tmp_path)
    half = np.zeros((3, 32, 32), dtype=np.uint8)
    half[:, :, 16:] = 255  # dark left, bright right
    for name in ("data_batch_1", "test_batch"):
        with open(folder / name, "rb") as f:
            batch = pickle.load(f)
        batch[b"data"][0] = half.reshape(-1)
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    dm = ImageDataModule("cifar10", data_dir=tmp_path, verify_checksums=False, random_flip=True)
    dm.setup()
    torch.manual_seed(0)

    def left_is_dark(x):
        return bool(x[:, :, :16].mean() < x[:, :, 16:].mean())

    train = {left_is_dark(dm.train_set[0][0]) for _ in range(40)}
    val = {left_is_dark(dm.val_set[0][0]) for _ in range(40)}
    assert train == {True, False} and val == {True}


# ---------------------------------------------------------------------------------------------- CelebA
@pytest.fixture
def celeba_dir(tmp_path):
    root = tmp_path / "celeba"
    img_dir = root / "img_align_celeba"
    img_dir.mkdir(parents=True)
    for i in range(1, 7):  # 178 x 218 like the real aligned images: black, with a white centre 160 x 160
        img = Image.new("RGB", (178, 218), (0, 0, 0))
        img.paste((255, 255, 255), ((178 - 160) // 2, (218 - 160) // 2, (178 + 160) // 2, (218 + 160) // 2))
        img.save(img_dir / f"{i:06d}.jpg", quality=95)
    (img_dir / "000007.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")  # corrupt
    parts = [0, 0, 0, 1, 1, 2, 0, 0]  # 000008.jpg is listed but absent
    (root / "list_eval_partition.txt").write_text("".join(f"{i:06d}.jpg {p}\n" for i, p in enumerate(parts, 1)))
    return tmp_path


@pytest.mark.filterwarnings("ignore:skipping unreadable image")  # 000007.jpg may be drawn; tested below
@pytest.mark.parametrize("image_size", [32, 64])
def test_celeba_crop_resize_and_partition(celeba_dir, image_size):
    dm = ImageDataModule("celeba", data_dir=celeba_dir, batch_size=2, image_size=image_size, center_crop=140,
                         channels=3, random_flip=True)
    with pytest.warns(RuntimeWarning, match="e.g. 000008.jpg"):
        dm.setup()
    assert (len(dm.train_set), len(dm.val_set)) == (4, 2)  # partition 0 (minus the absent file) / 1
    x, y = dm.val_set[0]
    assert x.shape == (3, image_size, image_size) and y == 0
    assert x.min() > 0.85 and x.max() < 1  # the centre 140 crop is all white: the crop is centred
    batch = next(iter(dm.train_dataloader()))[0]
    assert batch.shape == (2, 3, image_size, image_size) and batch.min() >= 0 and batch.max() < 1


def test_celeba_corrupt_image_is_skipped_with_a_warning(celeba_dir):
    dm = ImageDataModule("celeba", data_dir=celeba_dir, image_size=32, center_crop=140)
    with pytest.warns(RuntimeWarning):
        dm.setup()
    assert dm.train_set.files[3] == "000007.jpg"
    with pytest.warns(RuntimeWarning, match=r"skipping unreadable image .*000007\.jpg"):
        x, _ = dm.train_set[3]  # falls back to the next readable one (wrapping to 000001.jpg)
    assert x.shape == (3, 32, 32)
    pickle.dumps(dm.train_set)
    loader = torch.utils.data.DataLoader(dm.val_set, batch_size=2, num_workers=1)
    assert next(iter(loader))[0].shape == (2, 3, 32, 32)


def test_missing_celeba_names_the_files(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        ImageDataModule("celeba", data_dir=tmp_path).setup()
    msg = str(err.value)
    assert str(tmp_path / "celeba" / "img_align_celeba") in msg
    assert str(tmp_path / "celeba" / "list_eval_partition.txt") in msg and "download" in msg


# ---------------------------------------------------------------------------------------------- bundled MNIST
def test_mnist_bundled_is_real_digits_split_4500_500():
    dm = ImageDataModule("mnist_bundled", batch_size=100, seed=3)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set)) == (4500, 500)
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (100, 1, 28, 28) and x.min() >= 0 and x.max() < 1
    assert 0.08 < x.mean().item() < 0.2  # MNIST's mean intensity is about 0.13
    assert set(dm.val_set.labels.tolist()) == set(range(10))
    again = ImageDataModule("mnist_bundled", seed=4, val_size=500)
    again.setup()
    assert torch.equal(again.val_set.images, dm.val_set.images)  # a fixed split, not the run seed


# ---------------------------------------------------------------------------------------------- config errors
def test_unknown_dataset_lists_the_names(tmp_path):
    with pytest.raises(ConfigError, match="mnist, cifar10, celeba, mnist_bundled"):
        ImageDataModule("svhn", data_dir=tmp_path)
    with pytest.raises(ConfigError, match="toy_gmm"):
        build_datasets("svhn")


def test_global_batch_must_divide_over_devices(mnist_dir):
    assert per_device_batch_size(128, 4) == 32
    with pytest.raises(ConfigError, match="batch_size 130 is not divisible by 4 devices; choose a multiple of 4"):
        per_device_batch_size(130, 4)
    root, _ = mnist_dir
    dm = ImageDataModule("mnist", data_dir=root, batch_size=4)
    dm.trainer = SimpleNamespace(world_size=2)
    assert dm.train_dataloader().batch_size == 2
    dm.trainer = SimpleNamespace(world_size=3)
    with pytest.raises(ConfigError, match="not divisible by 3 devices"):
        dm.train_dataloader()
    dm.trainer = None
    dm.batch_size = 16  # larger than the 8 training images: drop_last would give no batch
    with pytest.raises(ConfigError, match="lower data.batch_size"):
        dm.train_dataloader()
    toy = ToyDataModule(n_train=100, n_val=10, batch_size=10)
    toy.trainer = SimpleNamespace(world_size=4)
    with pytest.raises(ConfigError, match="choose a multiple of 4"):
        toy.train_dataloader()


def test_data_configs_instantiate(tmp_path):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    for path in sorted(CONF.glob("*.yaml")):
        cfg = OmegaConf.load(path)
        cfg = OmegaConf.merge({"paths": {"data_dir": str(tmp_path)}, "seed": 0}, {"data": cfg})
        dm = instantiate(cfg.data)
        if isinstance(dm, ImageDataModule):
            assert (dm.channels, dm.image_size) == (cfg.data.channels, cfg.data.image_size), path.name


# ---------------------------------------------------------------------------------------------- toy mixture
def test_toy_gmm_component_shares():
    dm = ToyDataModule(n_train=10000, n_val=2000, batch_size=128, seed=0)
    dm.setup()
    x, k = dm.train_set.tensors
    assert x.shape == (10000, 2) and abs((k == 0).float().mean().item() - 0.2) < 0.02
    assert torch.allclose(x[k == 0].mean(0), torch.tensor([-5.0, -5.0]), atol=0.15)
    assert torch.allclose(x[k == 1].mean(0), torch.tensor([5.0, 5.0]), atol=0.1)
    assert abs((dm.val_set.tensors[1] == 1).float().mean().item() - 0.8) < 0.04
    xb, kb = next(iter(dm.train_dataloader()))
    assert xb.shape == (128, 2) and kb.shape == (128,) and len(dm.train_dataloader()) == 10000 // 128
    assert dm.sample_batch(50).shape == (50, 2)
    assert torch.equal(gmm_sample(5, torch.Generator().manual_seed(1)), gmm_sample(5, torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("sigma", [0.0, 0.1, 1.0, 5.0, "per_sample"])
def test_gmm_perturbed_score_matches_autograd(sigma):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(256, 2, generator=g, dtype=torch.float64) * 6).requires_grad_(True)
    if sigma == "per_sample":
        sigma = torch.rand(256, 1, generator=g, dtype=torch.float64) * 10
    (grad,) = torch.autograd.grad(gmm_log_prob(x, sigma).sum(), x)
    assert torch.allclose(gmm_perturbed_score(x.detach(), sigma), grad, atol=1e-8, rtol=1e-6)


def test_gmm_density_and_score_are_stable():
    h = 0.05
    t = torch.arange(-16, 16, h, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).view(-1, 2)
    assert gmm_log_prob(grid, 2.0).exp().sum().item() * h * h == pytest.approx(1.0, abs=1e-3)
    far = torch.tensor([[1000.0, 1000.0], [-1000.0, 3.0]])
    s = gmm_perturbed_score(far, torch.tensor([0.01]))
    assert torch.isfinite(s).all()
    assert torch.allclose(s[0], (torch.tensor([5.0, 5.0]) - far[0]) / 1.0001, rtol=1e-4)
    assert gmm_perturbed_score(torch.zeros(3, 2), torch.tensor([1.0, 2.0, 3.0])).shape == (3, 2)


def test_bundled_digits_fetched_as_a_batch_dequantise_each_pixel_like_one_at_a_time():
    """The DataLoader's batched fetch (UInt8ImageDataset.__getitems__) gives every pixel k a value in
    [k/256, (k+1)/256), as the per-image transform does, with the right labels and shapes."""
    from ncsn.app.datamodules import ImageDataModule

    dm = ImageDataModule(name="mnist_bundled", batch_size=8)
    dm.setup("fit")
    ds = dm.train_set
    idx = [0, 3, 17, 4499]
    batched = ds.__getitems__(idx)
    for (xb, lb), i in zip(batched, idx, strict=True):
        xs, ls = ds[i]
        assert xb.shape == xs.shape == (1, 28, 28) and xb.dtype == xs.dtype == torch.float32 and lb == ls
        k = ds.images[i].to(torch.float32)
        for x in (xb, xs):
            assert torch.equal((x[0] * 256).floor(), k)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 28, 28) and y.shape == (8,)
