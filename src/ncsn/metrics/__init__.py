"""Sample-quality metrics: FID and Inception Score (through torchmetrics) and one built-in quality metric per
dataset (``quality_metric_for``). Plain PyTorch: the Lightning callback ``val/fid`` is ``ncsn.app.fid_callback``.

Images are model-range tensors: float in [0, 1], shape [N, C, H, W] with C = 1 or 3 (values outside
[0, 1] are clamped). Grey images are repeated to 3 channels for the standard Inception network, which
resizes every image to 299x299 itself (so 28x28 MNIST and 32x32 CIFAR-10 work as they are).

Feature networks (``feature=``):

* the standard Inception-v3 of the FID paper (the TF weights converted by torch-fidelity): ``2048``
  (the pool features used for published FIDs), or ``64``, ``192``, ``768`` (earlier layers, for quick
  checks on few samples). It needs the ``torch-fidelity`` package and its weights file
  ``weights-inception-2015-12-05-6726825d.pth`` (``INCEPTION_WEIGHTS_URL``, about 100 MB). Weights are
  looked up, in order: the path given (config ``paths.inception_weights=<path>``, read by train.py and
  sample.py), then torch hub's
  cache (``$TORCH_HOME/hub/checkpoints/``); a download happens only when asked for
  (``allow_download=True``, config ``fid.allow_download=true``). Otherwise a missing file is a one-line
  ``ConfigError`` saying which file to put where: nothing probes the network. Images are quantised to uint8 with
  rounding (``round(255 x)``, like saving a PNG) and resized the TF1 way (``antialias=False``), as the
  reference implementations do; torchmetrics' own ``normalize=True`` truncates instead, which moves real
  images stored as uint8 down by one grey level.
* ``"small"``: ``SmallFeatureNet()``, a tiny fixed random conv net: works offline and in tests, and is
  fine for tracking one run's progress, but its numbers mean nothing next to published FIDs.
* any ``nn.Module`` mapping float images in [0, 1] (the channels as given) to features [N, F]; give it a
  ``num_features`` attribute, or torchmetrics runs a dummy [1, 3, 299, 299] image through it to find F.

Inception Score needs class logits: with the standard Inception it uses the Inception's own 1008-way
logits (``logits_unbiased``, as torch-fidelity); with a custom feature network it is computed only when
``is_feature=<module returning logits [N, num_classes]>`` is given, otherwise it is ``None``.

How to read the numbers: papers report FID between 50,000 samples and the training set (NCSN, Song & Ermon
2019: CIFAR-10 FID 25.32, IS 8.87 with 50k samples). FID estimated from fewer samples is biased upward
(by roughly a constant over N, and much more once N falls below the feature dimension, 2048, where the
covariance is singular), so a 1,000-sample FID logged during training is higher than the 50k one. FIDs are
comparable only at the same sample counts (real and fake), the same feature network (and weights), and the
same reference set; IS likewise at the same sample count and number of splits.

``ncsn.app.fid_callback.FIDCallback`` logs ``val/fid`` during training (see its docstring for EMA and multi-GPU
behaviour).

Modules: ``features`` (feature networks, Inception weights), ``fid`` (FID / IS builders,
``compute_image_metrics``), ``digits`` (the shipped MNIST digit
classifier), ``quality`` (``quality_metric_for``: the offline sample-quality metric of every shipped dataset,
built from ``digit_quality``, ``toy_quality``, ``image_quality``), ``registry`` (which metric and primary key each
dataset gets), ``distances`` (KID, energy and Fréchet distances), ``images`` (the one image normalisation),
``python -m ncsn.metrics score FILE.npz`` runs ``ncsn.tools.score``.
"""

from ncsn.metrics.features import (
    INCEPTION_FEATURES,
    INCEPTION_WEIGHTS_FILENAME,
    INCEPTION_WEIGHTS_URL,
    SmallFeatureNet,
    feature_from_config,
    feature_name,
    inception_available,
    resolve_inception_weights,
)

# Everything but the feature-network names loads on first use (PEP 562): `import ncsn.metrics` does not import
# torchmetrics (fid), and `python -m ncsn.metrics.digits` does not import
# ncsn.metrics.digits twice.
_LAZY = {
    "build_fid_metric": "fid",
    "build_inception_score_metric": "fid",
    "compute_image_metrics": "fid",
    "iter_image_batches": "fid",
    "SampleQuality": "base",
    "DigitQuality": "digit_quality",
    "ToyMixtureQuality": "toy_quality",
    "InceptionQuality": "image_quality",
    "PixelQuality": "image_quality",
    "quality_metric_for": "quality",
    "frechet_distance": "distances",
    "kernel_distance": "distances",
    "image01": "images",
    "primary_quality_key": "registry",
    "primary_quality_keys": "registry",
    "quality_key_in": "registry",
    "DigitCNN": "digits",
    "load_classifier": "digits",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ncsn.metrics' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f"ncsn.metrics.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "INCEPTION_FEATURES",
    "INCEPTION_WEIGHTS_FILENAME",
    "INCEPTION_WEIGHTS_URL",
    "DigitCNN",
    "DigitQuality",
    "InceptionQuality",
    "PixelQuality",
    "SampleQuality",
    "SmallFeatureNet",
    "ToyMixtureQuality",
    "build_fid_metric",
    "build_inception_score_metric",
    "compute_image_metrics",
    "feature_from_config",
    "feature_name",
    "frechet_distance",
    "image01",
    "inception_available",
    "iter_image_batches",
    "kernel_distance",
    "load_classifier",
    "primary_quality_key",
    "primary_quality_keys",
    "quality_key_in",
    "quality_metric_for",
    "resolve_inception_weights",
]
