"""Distances between two samples of features, as plain functions over arrays (no models, no datasets).

* ``kernel_distance`` (KID): the UNBIASED estimator of the squared MMD with the cubic polynomial kernel
  k(a, b) = (a·b / d + 1)³ (Bińkowski et al. 2018, the kernel of the Kernel Inception Distance). Its expectation
  does not depend on the number of samples, so values mean the same at any N (only their noise shrinks, like
  1/√N): the primary quality number of every image dataset. With a standard error from the delete-one jackknife
  over the samples (the reference is fixed).
* ``energy_distance``: the unbiased energy distance 2E|X−Y| − E|X−X'| − E|Y−Y'| (for 2-D points).
* ``frechet_distance`` / ``gaussian_stats``: the Fréchet distance between Gaussians fitted to the features
  (FID's formula). Biased upward at small N (roughly by a constant / N): kept as a secondary number.

Every function works in float64 on the CPU.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "KernelReference",
    "check_count",
    "energy_distance",
    "frechet_distance",
    "gaussian_stats",
    "kernel_distance",
    "mean_pair_distance",
]


def check_count(samples) -> int:
    """``len(samples)``, which must be at least 2 (a ValueError otherwise)."""
    n = len(samples)
    if n < 2:
        raise ValueError(f"sample quality needs at least 2 samples, got {n}")
    return n


def _array(feats) -> np.ndarray:
    f = np.asarray(feats.detach().cpu() if torch.is_tensor(feats) else feats, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"distances need features [N >= 2, F], got shape {f.shape}")
    return f


def _one_blas_thread() -> contextlib.AbstractContextManager:
    """One BLAS thread for the small matrices here: on a busy CPU, OpenBLAS's thread pool makes a 128x128
    eigendecomposition 50x slower (4 ms -> 0.2 s measured)."""
    try:
        from threadpoolctl import threadpool_limits  # installed with scikit-learn (a dependency of mlxtend)
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


# ---------------------------------------------------------------------------------------------- Fréchet
def gaussian_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64) of features [N, F], N >= 2."""
    f = _array(feats)
    return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_distance(stats1: tuple[np.ndarray, np.ndarray], stats2: tuple[np.ndarray, np.ndarray]) -> float:
    """‖μ1 − μ2‖² + tr(C1 + C2 − 2 (C1^½ C2 C1^½)^½), in float64 through symmetric eigendecompositions (stable
    for the rank-deficient covariances of small sample counts)."""
    mu1, c1 = stats1
    mu2, c2 = stats2
    with _one_blas_thread():
        w, v = np.linalg.eigh(c1)
        root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        middle = root1 @ c2 @ root1
        cross = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(max(0.0, ((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2.0 * cross))


# ---------------------------------------------------------------------------------------------- KID
def _poly_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a @ b.T / a.shape[1] + 1.0) ** 3


@dataclass(frozen=True)
class KernelReference:
    """The reference side of ``kernel_distance``, computed once: its features and the mean of k(y, y') over
    distinct reference pairs (chunked: 10,000 references need no 10,000² matrix at once)."""

    feats: np.ndarray
    mean_pair_kernel: float

    @classmethod
    def of(cls, feats, chunk: int = 2048) -> KernelReference:
        y = _array(feats)
        n = len(y)
        total = 0.0
        with _one_blas_thread():
            for i in range(0, n, chunk):
                block = _poly_kernel(y[i : i + chunk], y)
                total += block.sum() - np.trace(block[:, i : i + chunk])
        return cls(y, total / (n * (n - 1)))


def kernel_distance(samples, reference: KernelReference) -> tuple[float, float]:
    """(unbiased MMD², its jackknife standard error) between sample features [m, d] and the reference.

    MMD²_u = mean_{i≠j} k(x_i, x_j) + mean_{i≠j} k(y_i, y_j) − 2 mean_{i,j} k(x_i, y_j). It can be slightly
    negative when the two sides come from the same distribution. The standard error is NaN for m < 3; it is over
    the samples only (delete-one jackknife, the reference held fixed), so it leaves out the reference's own noise.
    """
    x = _array(samples)
    m = len(x)
    with _one_blas_thread():
        kxx = _poly_kernel(x, x)
        kxy_rows = _poly_kernel(x, reference.feats).sum(1)  # [m]
    n = len(reference.feats)
    diag = np.diag(kxx)
    rows_xx = kxx.sum(1) - diag  # off-diagonal row sums
    sxx = rows_xx.sum()
    sxy = kxy_rows.sum()
    value = sxx / (m * (m - 1)) + reference.mean_pair_kernel - 2.0 * sxy / (m * n)
    if m < 3:
        return float(value), math.nan
    leave_out = ((sxx - 2.0 * rows_xx) / ((m - 1) * (m - 2)) + reference.mean_pair_kernel
                 - 2.0 * (sxy - kxy_rows) / ((m - 1) * n))
    stderr = math.sqrt((m - 1) / m * ((leave_out - leave_out.mean()) ** 2).sum())
    return float(value), stderr


# ---------------------------------------------------------------------------------------------- energy
def _mean_distance(a: torch.Tensor, b: torch.Tensor, chunk: int = 1024) -> float:
    return float(sum(torch.cdist(a[i : i + chunk], b).sum() for i in range(0, len(a), chunk)) / (len(a) * len(b)))


def mean_pair_distance(y: torch.Tensor) -> float:
    """E|Y − Y'| over distinct pairs of the points y [n, D] (float64)."""
    y = y.double()
    return _mean_distance(y, y) * len(y) / (len(y) - 1)  # the diagonal is 0: rescale the mean to distinct pairs


def energy_distance(x: torch.Tensor, y: torch.Tensor, y_self: float | None = None) -> float:
    """Unbiased energy distance between points x [m, D] and y [n, D] (float64): 2 E|X−Y| − E|X−X'| − E|Y−Y'|,
    the within-sample means over distinct pairs. ``y_self``: E|Y−Y'| when already known (a fixed reference)."""
    x, y = x.double(), y.double()
    if y_self is None:
        y_self = mean_pair_distance(y)
    return 2.0 * _mean_distance(x, y) - mean_pair_distance(x) - y_self
