"""Score a samples file with the dataset's sample-quality metric, built exactly as training builds it:

    python -m ncsn.metrics score FILE.npz [data=NAME] [data.KEY=VALUE ...] [paths.data_dir=DIR]
                                [paths.inception_weights=FILE] [experiment=NAME] [device=cpu]

FILE: ``samples.npz`` as ``sample.py`` writes it (key ``samples``: uint8 [N, H, W, C]), any ``.npz`` holding one
array, a ``.npy`` array, or a ``.pt`` / ``.pth`` tensor (``torch.save``; a dict with one tensor or ``samples``):
images [N, H, W(, C)] (or [N, C, H, W]) as integers in [0, 255] or floats in [0, 1], or 2-D points [N, 2].
Anything else (another range, NaN, a bool or text array) is one error line, never a score.
``data`` defaults to ``mnist_bundled`` for 28x28 grey images and ``toy_gmm`` for points; other
images need it (``cifar10``, ``celeba``). The dataset is the config group ``conf/data/NAME.yaml`` composed with
Hydra as ``train.py`` composes it, with the same overrides (``data.image_size=64``, ``paths.data_dir=DIR``, or a
run's ``experiment=NAME``), so CelebA is centre-cropped as in training and the values equal the training pass's
on the same samples; the Inception weights are the sample grid's (``paths.inception_weights``). ``data_dir=DIR``
and ``inception_weights=FILE`` are short for the two ``paths.`` settings. The last printed line is one JSON object:
the primary key first, then every key of the metric, then ``num_samples`` and ``data``.
"""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import numpy as np

from ncsn.errors import UserError

EXIT_USER_ERROR = 2
USAGE = ("usage: python -m ncsn.metrics score FILE.npz [data=NAME] [data.KEY=VALUE ...] [paths.data_dir=DIR] "
         "[paths.inception_weights=FILE] [experiment=NAME] [device=D]")
#: short forms of config settings
ALIASES = {"data_dir": "paths.data_dir", "inception_weights": "paths.inception_weights"}


TORCH_SUFFIXES = (".pt", ".pth")


def _one_of(path: Path, names: list[str], get):
    """The array named ``samples``, or the only one."""
    if "samples" in names:
        return get("samples")
    if len(names) == 1:
        return get(names[0])
    if not names:
        raise UserError(f"{path} holds no array; pass the samples.npz that sample.py wrote")
    raise UserError(f"{path} holds arrays {names}: expected one array or one named 'samples'")


def _load_torch(path: Path) -> np.ndarray:
    import torch

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # whatever torch cannot read is not a samples file for us
        raise UserError(f"{path} is not a readable torch file ({type(err).__name__}); save the samples tensor "
                        "with torch.save(samples, path)") from err
    if isinstance(loaded, dict):
        tensors = {str(k): v for k, v in loaded.items() if torch.is_tensor(v)}
        loaded = _one_of(path, list(tensors), tensors.get)
    if not torch.is_tensor(loaded):
        raise UserError(f"{path} holds a {type(loaded).__name__}, not a tensor of samples")
    return loaded.detach().cpu().numpy()


def load_samples(path: str | Path) -> np.ndarray:
    """The sample array of a ``.npz`` (key ``samples``, or its only array), ``.npy`` or ``.pt`` file, checked
    (:func:`check_samples`); integer images come back as uint8."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory; pass the samples file inside it (samples.npz)")
    if not path.is_file():
        raise UserError(f"samples file {path} does not exist")
    if path.suffix in TORCH_SUFFIXES:
        return check_samples(_load_torch(path), path)
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):  # a .npy file
            return check_samples(loaded, path)
        with loaded:
            return check_samples(_one_of(path, list(loaded.keys()), loaded.__getitem__), path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise UserError(f"{path} is not a readable .npz/.npy file ({type(err).__name__}); pass the samples.npz "
                        "that sample.py wrote, or an array saved with numpy.save / numpy.savez") from err


def check_samples(samples: np.ndarray, path: str | Path) -> np.ndarray:
    """What a samples array must be to be scored: images [N, H, W(, C)] / [N, C, H, W] (integers in [0, 255],
    returned as uint8, or floats in [0, 1]) or points [N, 2] (finite numbers), with nothing NaN or infinite.
    Anything else is a UserError that says how to fix the file."""
    if samples.dtype.kind not in "uif":
        raise UserError(f"{path}: samples of dtype {samples.dtype}; expected uint8 images in [0, 255], float "
                        "images in [0, 1] or float points [N, 2]")
    points = samples.ndim == 2 and samples.shape[1] == 2
    if not points and samples.ndim not in (3, 4):
        raise UserError(f"{path}: an array of shape {samples.shape}; expected images [N, H, W(, C)] or "
                        "[N, C, H, W], or 2-D points [N, 2]")
    finite = np.isfinite(samples.reshape(len(samples), -1)).all(axis=1) if samples.size else np.ones(0, bool)
    if not finite.all():
        raise UserError(f"{path}: {int((~finite).sum())} of the {len(samples)} samples hold NaN or infinite "
                        "values (a diverged sampler?); drop them before scoring")
    if points or not samples.size:
        return samples
    low, high = float(samples.min()), float(samples.max())
    if samples.dtype.kind in "ui":
        if low < 0 or high > 255:
            raise UserError(f"{path}: integer images must lie in [0, 255] (got {low:g} to {high:g})")
        return samples.astype(np.uint8)
    if low < 0 or high > 1:
        hint = ("divide by 255, or save them as uint8" if low >= 0 and high <= 255 else
                "map [-1, 1] images to [0, 1] with (x + 1) / 2" if low >= -1 and high <= 1 else
                "rescale them")
        raise UserError(f"{path}: float images must lie in [0, 1] (got {low:g} to {high:g}); {hint}")
    return samples


def default_data(samples: np.ndarray) -> str:
    if samples.ndim == 2 and samples.shape[1] == 2:
        return "toy_gmm"
    if samples.ndim in (3, 4) and {s for s in samples.shape[1:] if s != 1} == {28}:
        return "mnist_bundled"
    raise UserError(f"cannot tell the dataset of samples shaped {samples.shape}: add data=NAME (e.g. data=cifar10)")


def compose_run_config(overrides: list[str]):
    """``(data name, cfg)``: conf/train.yaml composed as ``train.py`` composes it with ``overrides`` (the data group,
    ``paths.*``, an experiment); see ``ncsn.app.command_line.compose_with_data``."""
    from ncsn.app.command_line import compose_with_data, find_conf_dir

    return compose_with_data(find_conf_dir(), overrides, job_name="score")


def score_file(path: str | Path, overrides: list[str] = (), device: str | None = None) -> dict:
    """The metric's values for the samples in ``path`` (primary key first), plus ``num_samples`` and ``data``.
    ``overrides``: Hydra overrides of conf/train.yaml (``data=celeba``, ``data.image_size=64``, ...)."""
    from omegaconf import OmegaConf

    from ncsn.app.datamodules import quality_metric_for_data

    samples = load_samples(path)
    overrides = list(overrides)
    if not any(o.split("=", 1)[0] in ("data", "experiment") for o in overrides):
        overrides.insert(0, f"data={default_data(samples)}")
    data, cfg = compose_run_config(overrides)
    # the sample grid's setting, as in training (callbacks.sample_grid.inception_weights: paths.inception_weights)
    weights = OmegaConf.select(cfg, "callbacks.sample_grid.inception_weights", default=None)
    if weights and not Path(str(weights)).is_file():
        raise UserError(f"inception_weights file {weights} does not exist; pass the downloaded .pth file "
                        f"(paths.inception_weights=FILE)")
    metric = quality_metric_for_data(cfg.data, num_samples=max(2, len(samples)), device=device,
                                     inception_weights=weights)
    if metric is None:
        raise UserError(f"data={data} has no sample-quality metric")
    try:
        import torch

        values = metric(torch.as_tensor(samples))
    except ValueError as err:
        raise UserError(f"{path}: {err}") from err
    ordered = {metric.name: values[metric.name], **values}
    return {**ordered, "num_samples": len(samples), "data": data}


def parse_args(args: list[str]) -> tuple[list[str], str | None]:
    """``(Hydra overrides, device)`` of the ``key=value`` arguments after FILE."""
    overrides, device = [], None
    for arg in args:
        key, sep, value = arg.partition("=")
        key = ALIASES.get(key, key)
        if key == "device" and sep:
            device = value
        elif sep and (key in ("data", "experiment") or key.startswith(("data.", "paths."))):
            overrides.append(f"{key}={value}")
        else:
            raise UserError(f"unknown argument {arg!r}; {USAGE}")
    return overrides, device


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(args):
        print(f"{USAGE}\n\n{__doc__.strip()}")
        return 0
    try:
        if len(args) < 2 or args[0] != "score":
            raise UserError(USAGE)
        overrides, device = parse_args(args[2:])
        result = score_file(args[1], overrides, device=device)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    print(f"{result['data']}: {len(result) - 2} values from {result['num_samples']} samples (lower is better)")
    print(json.dumps(result), flush=True)
    return 0
