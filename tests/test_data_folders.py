"""LSUN (lmdb), FFHQ (a folder of PNGs) and image_folder (any folder of images): tiny files in each one's real
on-disk format, read through ImageDataModule as train.py builds it; the mistakes a user can make are one line."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from fakes import write_ffhq, write_image_folder, write_lsun
from PIL import Image

from ncsn.app.datamodules import ImageDataModule
from ncsn.data import image_transform
from ncsn.data.lsun import LSUNDatabase
from ncsn.errors import ConfigError, DataNotFoundError, UserError

pytest.importorskip("lmdb")


def assert_dequantised(x: torch.Tensor, image: Image.Image, size: int, native: int | None = None) -> None:
    """``x`` is ``image`` resized as the pipeline does, then dequantised: pixel k lands in [k/256, (k+1)/256)."""
    plain = image_transform(size, False, False, native_size=native, dequantize=False)(image)  # k / 255
    low = plain * 255.0 / 256.0
    assert x.shape == plain.shape
    assert bool(((x - low) >= -1e-6).all() and ((x - low) < 1 / 256 + 1e-6).all())


# ---------------------------------------------------------------------------------------------- LSUN
@pytest.fixture
def lsun_dir(tmp_path):
    return tmp_path, write_lsun(tmp_path / "lsun")


def test_lsun_reads_the_train_and_val_databases_in_key_order(lsun_dir):
    data_dir, written = lsun_dir
    dm = ImageDataModule("lsun", data_dir=data_dir, category="church_outdoor", image_size=16, random_flip=False)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (5, 3) and dm.data_shape == (3, 16, 16)
    for dataset, split in ((dm.train_set, "train"), (dm.val_set, "val")):
        keys = sorted(written[split])
        for i, key in enumerate(keys):
            x, label = dataset[i]
            assert label == 0
            assert_dequantised(x, Image.fromarray(written[split][key]), 16)


def test_lsun_fixture_is_what_torchvision_reads_and_so_do_we(lsun_dir, tmp_path, monkeypatch):
    """Our reader and torchvision's LSUN give the same images from the same database (torchvision's key cache
    goes to the current directory: a scratch one here)."""
    from torchvision.datasets import LSUN

    data_dir, _ = lsun_dir
    scratch = tmp_path / "cwd"
    scratch.mkdir()
    monkeypatch.chdir(scratch)
    ours = LSUNDatabase(data_dir / "lsun" / "church_outdoor_val_lmdb")
    ours_images = [np.asarray(ours[i][0]) for i in range(len(ours))]  # read first: torchvision keeps it open
    theirs = LSUN(str(data_dir / "lsun"), classes=["church_outdoor_val"])
    assert len(theirs) == len(ours_images) == 3
    for i in range(3):
        assert np.array_equal(np.asarray(theirs[i][0]), ours_images[i])
    assert list(scratch.iterdir()), "torchvision's key cache went to the scratch directory"


def test_lsun_loads_in_worker_processes(lsun_dir):
    data_dir, _ = lsun_dir
    dm = ImageDataModule("lsun", data_dir=data_dir, category="church_outdoor", image_size=8, batch_size=2,
                         num_workers=1)
    dm.setup("fit")
    ours = dm.train_set[0][0]  # the parent opens its own handle first; the worker must open another
    x, labels = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 8, 8) and labels.tolist() == [0, 0] and ours.shape == (3, 8, 8)


def test_lsun_mistakes_are_one_line(lsun_dir, tmp_path, monkeypatch):
    data_dir, _ = lsun_dir
    with pytest.raises(DataNotFoundError, match="LSUN bedroom not found: missing .*bedroom_train_lmdb and "
                                                ".*bedroom_val_lmdb; fetch it with LSUN's download.py -c bedroom"):
        ImageDataModule("lsun", data_dir=data_dir, category="bedroom").setup()
    with pytest.raises(DataNotFoundError, match="LSUN's categories: bedroom, bridge, church_outdoor"):
        ImageDataModule("lsun", data_dir=data_dir, category="churches").setup()
    with pytest.raises(UserError, match="data=lsun needs data.category="):
        ImageDataModule("lsun", data_dir=data_dir, category=None).setup()
    (tmp_path / "empty" / "tower_train_lmdb").mkdir(parents=True)
    (tmp_path / "empty" / "tower_val_lmdb").mkdir()
    with pytest.raises(DataNotFoundError, match="tower_train_lmdb is not a readable lmdb database"):
        ImageDataModule("lsun", path=tmp_path / "empty", category="tower").setup()
    monkeypatch.setitem(sys.modules, "lmdb", None)  # the package is not installed
    with pytest.raises(UserError, match=r"data=lsun needs the lmdb package: pip install lmdb"):
        ImageDataModule("lsun", data_dir=data_dir, category="church_outdoor").setup()


def test_a_damaged_lsun_record_is_named(tmp_path):
    import lmdb

    root = tmp_path / "kitchen_train_lmdb"
    env = lmdb.open(str(root), map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"0123abcd", b"not an image")
    env.close()
    with pytest.raises(DataNotFoundError, match="cannot read the image under key 0123abcd of .*kitchen_train_lmdb"):
        LSUNDatabase(root)[0]


# ---------------------------------------------------------------------------------------------- FFHQ
def test_ffhq_holds_out_ermongroup_ncsnv2s_split_and_resizes(tmp_path):
    files = write_ffhq(tmp_path / "ffhq", n=20, size=48)
    (tmp_path / "ffhq" / "LICENSE.txt").write_text("not an image")
    (tmp_path / "ffhq" / "preview.jpg").write_bytes(b"FFHQ is PNG only: jpg files are not read")
    dm = ImageDataModule("ffhq", data_dir=tmp_path, image_size=32, random_flip=False)
    dm.setup("fit")
    # ermongroup/ncsnv2 datasets/__init__.py: np.random.seed(2019), shuffle range(N), the first 90% train
    indices = list(range(20))
    state = np.random.get_state()
    np.random.seed(2019)
    np.random.shuffle(indices)
    np.random.set_state(state)
    assert dm.train_set.files == [files[i] for i in indices[:18]]
    assert dm.val_set.files == [files[i] for i in indices[18:]]
    x, label = dm.val_set[1]
    assert label == 0 and dm.data_shape == (3, 32, 32)
    assert_dequantised(x, Image.open(files[indices[19]]).convert("RGB"), 32)


# ---------------------------------------------------------------------------------------------- image_folder
@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder_reads_every_image_recursively_as_grey_or_rgb(tmp_path, channels):
    written = write_image_folder(tmp_path / "mine")
    dm = ImageDataModule("image_folder", path=tmp_path / "mine", image_size=16, channels=channels,
                         val_fraction=0.34, random_flip=False)
    dm.setup("fit")
    files = dm.train_set.files + dm.val_set.files
    assert sorted(p.relative_to(tmp_path / "mine").as_posix() for p in files) == sorted(written)
    assert (len(dm.train_set), len(dm.val_set)) == (3, 3)  # int(6 * 0.66) = 3 train
    assert dm.data_shape == (channels, 16, 16)
    mode = "L" if channels == 1 else "RGB"
    for dataset in (dm.train_set, dm.val_set):
        for i, path in enumerate(dataset.files):
            x, _ = dataset[i]
            assert_dequantised(x, Image.open(path).convert(mode), 16)


def test_image_folder_takes_same_size_images_as_they_are_without_resize(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (4, 12, 12, 3), dtype=np.uint8)
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(tmp_path / f"{i}.png")
    dm = ImageDataModule("image_folder", path=tmp_path, image_size=12, resize=False, val_fraction=0.25)
    dm.setup("fit")
    x, _ = dm.val_set[0]
    k = pixels[int(dm.val_set.files[0].stem)]
    low = torch.from_numpy(k).permute(2, 0, 1).float() / 256  # untouched pixels, dequantised
    assert bool(((x - low) >= -1e-6).all() and ((x - low) < 1 / 256 + 1e-6).all())


def test_image_folder_flips_only_training_images(tmp_path):
    img = np.zeros((8, 8, 3), dtype=np.uint8)
    img[:, :4] = 255  # left half white
    for i in range(4):
        Image.fromarray(img).save(tmp_path / f"{i}.png")
    dm = ImageDataModule("image_folder", path=tmp_path, image_size=8, val_fraction=0.25, random_flip=True)
    dm.setup("fit")
    torch.manual_seed(0)
    lefts = {float(dm.train_set[i % 3][0][:, :, :4].mean().round()) for i in range(24)}
    assert lefts == {0.0, 1.0}  # flipped and not
    assert all(float(dm.val_set[0][0][:, :, :4].mean().round()) == 1.0 for _ in range(8))


def test_image_folder_mistakes_are_one_line(tmp_path):
    def build(**kwargs):
        ImageDataModule("image_folder", **{"image_size": 16, **kwargs}).setup()

    cases = [
        ({"path": None}, ConfigError, "data=image_folder needs data.path=<folder of your images>"),
        ({"path": tmp_path / "nowhere"}, DataNotFoundError, "image folder .*nowhere does not exist; set data.path="),
    ]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    cases.append(({"path": tmp_path / "empty"}, DataNotFoundError, r"no images \(png, jpg, jpeg, webp\) in .*empty"))
    bad = tmp_path / "bad"
    bad.mkdir()
    Image.new("RGB", (16, 16)).save(bad / "fine.png")
    (bad / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    cases.append(({"path": bad}, DataNotFoundError, r"cannot read image .*broken.jpg \(UnidentifiedImageError"))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (16, 16)).save(mixed / "small.png")
    Image.new("RGB", (20, 20)).save(mixed / "large.png")
    cases.append(({"path": mixed, "resize": False}, ConfigError,
                  (r"have different sizes \(small.png is 16x16, large.png is 20x20\) and data.resize=false; set "
                   r"data.resize=true")))
    cases.append(({"path": mixed, "resize": False, "image_size": 20}, ConfigError, "different sizes"))
    same = tmp_path / "same"
    same.mkdir()
    for i in range(2):
        Image.new("RGB", (24, 24)).save(same / f"{i}.png")
    cases.append(({"path": same, "resize": False}, ConfigError,
                  "are 24x24, not data.image_size=16 square, and data.resize=false; set data.image_size=24"))
    cases.append(({"path": same, "channels": 2}, ConfigError, "read as 1 \\(grey\\) or 3 \\(RGB\\) channels"))
    cases.append(({"path": same, "val_fraction": 1.0}, ConfigError, "val_fraction=1.0 must be between 0 and 1"))
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message) as info:
            build(**kwargs)
        assert "\n" not in str(info.value), kwargs
    build(path=mixed)  # resized (the default): mixed sizes are fine


def test_a_damaged_image_is_named_when_it_is_read_also_in_a_worker(tmp_path):
    from ncsn.errors import one_line

    for i in range(2):
        Image.fromarray(np.full((64, 64, 3), i * 100, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "1.png").write_bytes((tmp_path / "1.png").read_bytes()[:60])  # header intact, pixels cut
    dm = ImageDataModule("image_folder", path=tmp_path, image_size=16, val_fraction=0.5, num_workers=1,
                         batch_size=1)
    dm.setup("fit")  # the header reads fine
    dataset = dm.train_set if dm.train_set.files[0].name == "1.png" else dm.val_set
    expected = f"cannot read image {tmp_path / '1.png'} (OSError: image file is truncated); delete or replace it"
    with pytest.raises(DataNotFoundError) as info:
        dataset[0]
    assert str(info.value) == one_line(info.value) == expected
    loader = dm.train_dataloader() if dataset is dm.train_set else dm.val_dataloader()
    with pytest.raises(DataNotFoundError) as info:  # re-raised from the worker with its traceback ...
        next(iter(loader))
    assert "\n" in str(info.value) and one_line(info.value) == expected  # ... and train.py prints this line


# ---------------------------------------------------------------------------------------------- quality, σ helper
def test_the_new_data_get_the_pixel_stand_in_without_inception_weights(tmp_path, monkeypatch):
    from ncsn.app.datamodules import quality_metric_for_data
    from ncsn.metrics import PixelQuality
    from ncsn.metrics.registry import primary_quality_key

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # no cached Inception weights
    write_image_folder(tmp_path / "mine")
    folder = {"_target_": "ncsn.app.datamodules.ImageDataModule", "name": "image_folder",
              "path": str(tmp_path / "mine"), "image_size": 16, "channels": 1, "val_fraction": 0.5}
    metric = quality_metric_for_data(folder, num_samples=3)
    assert isinstance(metric, PixelQuality) and metric.shape == (1, 16, 16) and metric.reference_count == 3
    assert metric.name == primary_quality_key(folder) == "quality/kid_pixels"
    result = metric(torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0)))
    assert set(result) >= {"quality/kid_pixels", "quality/kid_pixels_std", "quality/kid_pixels_floor"}

    write_lsun(tmp_path / "data" / "lsun")
    lsun = quality_metric_for_data({"name": "lsun", "category": "church_outdoor", "image_size": 16},
                                   num_samples=4, data_dir=tmp_path / "data")
    assert isinstance(lsun, PixelQuality) and lsun.reference_count == 3  # the val database, all of it


def test_ffhq_with_inception_weights_gives_kid(tmp_path, monkeypatch):
    from fakes import fake_inception_weights

    from ncsn.app.datamodules import quality_metric_for_data
    from ncsn.metrics import InceptionQuality
    from ncsn.metrics.features import inception_available

    if not inception_available():
        pytest.skip("torch-fidelity is not installed")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    weights = tmp_path / "inception.pth"
    fake_inception_weights(weights, monkeypatch)
    write_ffhq(tmp_path / "ffhq", n=20, size=16)
    metric = quality_metric_for_data({"name": "ffhq", "image_size": 16}, num_samples=2, data_dir=tmp_path,
                                     inception_weights=weights, device="cpu")
    assert (isinstance(metric, InceptionQuality) and metric.name == "quality/kid_inception"
            and metric.reference_count == 2)
    result = metric(torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    assert set(result) == {"quality/kid_inception", "quality/kid_inception_std", "quality/kid_inception_floor",
                           "quality/fid"}


def test_the_sigma_helper_picks_sigma_1_from_a_folder_of_images(tmp_path, capsys):
    from ncsn.sigmas import largest_pairwise_distance
    from ncsn.tools.sigma_helper import main

    write_image_folder(tmp_path / "mine")
    main(["suggest", "data=image_folder", f"data.path={tmp_path / 'mine'}", "data.image_size=16", "steps_each=3"])
    out = capsys.readouterr().out
    assert "data: image_folder, 5 training examples of shape (3, 16, 16)" in out
    printed = next(line for line in out.splitlines() if "sigma_1 (sigma_max)" in line).split()[-1]
    sigma_1 = float(printed)
    dm = ImageDataModule("image_folder", path=tmp_path / "mine", image_size=16)
    dm.setup()
    train = torch.stack([dm.train_set[i][0] for i in range(len(dm.train_set))])
    assert sigma_1 == pytest.approx(largest_pairwise_distance(train), rel=0.02)  # up to dequantisation noise
    assert f"sigmas.sigma_max={printed} " in out  # in the overrides to paste after train.py


def test_the_score_command_reads_the_new_data_as_training_composes_it(tmp_path, monkeypatch, capsys):
    import json

    from ncsn.tools.score import main

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    write_ffhq(tmp_path / "mine", n=20, size=16)  # 2 held out: the reference
    write_lsun(tmp_path / "data" / "lsun")
    samples = tmp_path / "samples.npz"
    np.savez(samples, samples=np.random.default_rng(0).integers(0, 256, (4, 12, 12, 1), dtype=np.uint8))
    assert main(["score", str(samples), "data=image_folder", f"data.path={tmp_path / 'mine'}", "data.image_size=12",
                 "data.channels=1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert next(iter(result)) == "quality/kid_pixels" and result["num_samples"] == 4  # grey 12 x 12 reference
    np.savez(samples, samples=np.random.default_rng(0).integers(0, 256, (4, 20, 20, 3), dtype=np.uint8))
    args = ["score", str(samples), "data=lsun", f"data_dir={tmp_path / 'data'}", "data.image_size=20"]
    assert main([*args, "data.category=bedroom"]) == 2 and "LSUN bedroom not found" in capsys.readouterr().err
    assert main(args) == 0  # the group's category, church_outdoor
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["data"] == "lsun"
