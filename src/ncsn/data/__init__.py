"""The data layer: transforms (value ranges) and dataset builders, plain PyTorch.

The model range is [0, 1] (see ``ncsn.data.transforms``). The Lightning DataModules over these datasets are
``ncsn.app.datamodules``.
"""

from ncsn.data.datasets import (
    DATASET_NAMES,
    IMAGE_DATASETS,
    build_datasets,
    build_image_datasets,
    gmm_log_prob,
    gmm_perturbed_score,
    gmm_sample,
)
from ncsn.data.transforms import Dequantize, image_transform, to_image_range, to_model_range, to_uint8

__all__ = [
    "DATASET_NAMES",
    "IMAGE_DATASETS",
    "Dequantize",
    "build_datasets",
    "build_image_datasets",
    "gmm_log_prob",
    "gmm_perturbed_score",
    "gmm_sample",
    "image_transform",
    "to_image_range",
    "to_model_range",
    "to_uint8",
]
