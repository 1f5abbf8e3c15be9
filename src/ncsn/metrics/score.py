"""Score a samples file with the dataset's sample-quality metric:

    python -m ncsn.metrics score FILE.npz [data=NAME] [data_dir=DIR] [path=DIR] [category=NAME]
                                           [inception_weights=FILE] [device=cpu]

FILE: ``samples.npz`` as ``sample.py`` writes it (key ``samples``: uint8 [N, H, W, C]), any ``.npz`` holding one
array, or a ``.npy`` array: uint8 images [N, H, W(, C)] (or [N, C, H, W]; float in [0, 1] also works) or 2-D
points [N, 2]. ``data`` defaults to ``mnist_bundled`` for 28x28 grey images and ``toy_gmm`` for points; other
images need it (``cifar10``, ``celeba``, ``lsun`` with ``category``, ``ffhq``, ``image_folder`` with ``path``; and
``data_dir``). The real images are read at the samples' size (and, for ``image_folder``, their channels). The last
printed line is one JSON object: the primary key first, then every key of the metric, then ``num_samples`` and
``data``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from ncsn.errors import UserError

EXIT_USER_ERROR = 2
USAGE = ("usage: python -m ncsn.metrics score FILE.npz [data=NAME] [data_dir=DIR] [path=DIR] [category=NAME] "
         "[inception_weights=FILE] [device=D]")
OPTIONS = ("data", "data_dir", "path", "category", "inception_weights", "device")


def load_samples(path: str | Path) -> np.ndarray:
    """The sample array of a ``.npz`` (key ``samples``, or its only array) or ``.npy`` file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"samples file {path} does not exist")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):  # a .npy file
            return loaded
        with loaded:
            names = list(loaded.keys())
            if "samples" in names:
                return loaded["samples"]
            if len(names) == 1:
                return loaded[names[0]]
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is not a readable .npz/.npy file ({type(err).__name__}: {err})") from err
    raise UserError(f"{path} holds arrays {names}: expected one array or one named 'samples'")


def default_data(samples: np.ndarray) -> str:
    if samples.ndim == 2 and samples.shape[1] == 2:
        return "toy_gmm"
    if samples.ndim in (3, 4) and {s for s in samples.shape[1:] if s != 1} == {28}:
        return "mnist_bundled"
    raise UserError(f"cannot tell the dataset of samples shaped {samples.shape}: add data=NAME (e.g. data=cifar10)")


def score_file(samples_file: str | Path, /, **options: str) -> dict:
    """The metric's values for the samples in ``samples_file`` (primary key first), plus ``num_samples`` and ``data``."""
    from ncsn.metrics.quality import quality_metric_for_data

    samples = load_samples(samples_file)
    data = options.get("data") or default_data(samples)
    fields: dict = {"name": data, **{k: options[k] for k in ("path", "category") if options.get(k)}}
    if samples.ndim in (3, 4) and data != "toy_gmm":  # the real images at the samples' size (and channels)
        from ncsn.metrics.images import image01

        try:
            shape = image01(samples[:1]).shape
        except ValueError as err:
            raise UserError(f"{samples_file}: {err}") from err
        fields["image_size"] = int(shape[-1])
        if data == "image_folder":
            fields["channels"] = int(shape[1])
    metric = quality_metric_for_data(fields, num_samples=max(2, len(samples)), device=options.get("device"),
                                     data_dir=options.get("data_dir"),
                                     inception_weights=options.get("inception_weights"))
    if metric is None:
        raise UserError(f"data={data} has no sample-quality metric")
    try:
        import torch

        values = metric(torch.as_tensor(samples))
    except ValueError as err:
        raise UserError(f"{samples_file}: {err}") from err
    ordered = {metric.name: values[metric.name], **values}
    return {**ordered, "num_samples": len(samples), "data": data}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if len(args) < 2 or args[0] != "score":
            raise UserError(USAGE)
        options = {}
        for arg in args[2:]:
            key, sep, value = arg.partition("=")
            if not sep or key not in OPTIONS:
                raise UserError(f"unknown argument {arg!r}; {USAGE}")
            options[key] = value
        result = score_file(args[1], **options)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    print(f"{result['data']}: {len(result) - 2} values from {result['num_samples']} samples (lower is better)")
    print(json.dumps(result), flush=True)
    return 0
