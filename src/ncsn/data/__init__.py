"""The data layer: transforms (value ranges), dataset builders and Lightning DataModules.

The model range is [0, 1] (see ``ncsn.data.transforms``); ``batch_size`` in the DataModules is global.
"""

from ncsn.data.datamodules import ImageDataModule, ToyDataModule, per_device_batch_size
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
    "ImageDataModule",
    "ToyDataModule",
    "build_datasets",
    "build_image_datasets",
    "gmm_log_prob",
    "gmm_perturbed_score",
    "gmm_sample",
    "image_transform",
    "per_device_batch_size",
    "to_image_range",
    "to_model_range",
    "to_uint8",
]
