# Copyright (c) monai_armed contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""
Batch-effect metrics of autoencoder latents and reconstructions (reference §5.7-5.8, Table V).

* :func:`latent_cluster_scores`: how strongly encoder latents cluster by batch (Davies-Bouldin, Calinski-Harabasz).
* :func:`image_quality_metrics`: brightness, contrast, sharpness and SNR of each (reconstructed) image.
* :func:`anova_f_by_cluster`: one-way ANOVA F of such per-image values across batches.
* :func:`reconstruction_mse`: mean squared reconstruction error per image or overall.

Inputs may be numpy arrays, torch tensors or nested sequences; the work is done by scikit-learn and scipy.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.utils import convert_to_numpy
from scipy import ndimage
from scipy.stats import f_oneway
from sklearn.metrics import calinski_harabasz_score, davies_bouldin_score
from sklearn.preprocessing import StandardScaler

__all__ = ["latent_cluster_scores", "image_quality_metrics", "anova_f_by_cluster", "reconstruction_mse"]

ArrayLike = np.ndarray | torch.Tensor | Sequence
_SINGLE_KEY = "value"


def _labels(clusters: ArrayLike, n: int, what: str) -> np.ndarray:
    """The ``(N,)`` batch labels, checked against the ``n`` samples of ``what``."""
    labels = convert_to_numpy(clusters, wrap_sequence=True)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise ValueError(f"clusters must be a 1-D array of batch labels (N,), got shape {labels.shape}.")
    if labels.shape[0] != n:
        raise ValueError(f"clusters and {what} differ in length: {labels.shape[0]} labels vs {n} samples.")
    return labels


def _count_non_finite(values: np.ndarray) -> str:
    """E.g. ``"2 nan and 1 inf"`` for the non-finite entries of ``values``."""
    return f"{int(np.isnan(values).sum())} nan and {int(np.isinf(values).sum())} inf"


def latent_cluster_scores(latents: ArrayLike, clusters: ArrayLike, standardize: bool = True) -> dict[str, float]:
    """
    Davies-Bouldin and Calinski-Harabasz scores of latent vectors grouped by their batch (e.g. imaging date).

    Both scores measure how well the latents separate into the batches. A fixed-effects latent should carry no
    batch information, so for it **higher Davies-Bouldin and lower Calinski-Harabasz are better** (less batch
    clustering); a random-effects latent is meant to cluster by batch, so there the reverse holds.

    Args:
        latents: ``(N, D)`` latent vectors; ``(N, *dims)`` arrays are flattened to ``(N, D)``.
        clusters: ``(N,)`` batch labels (integers or strings); every distinct value is one batch, including an
            unseen index such as ``-1`` (filter such samples out beforehand if they should not count).
        standardize: z-score each latent dimension over the samples first (the authors' end-of-training
            convention); a constant dimension becomes all zeros instead of NaN. ``False`` uses the raw latents
            (the authors' per-epoch callback).

    Returns:
        ``{"davies_bouldin": float, "calinski_harabasz": float}`` from :func:`sklearn.metrics.davies_bouldin_score`
        and :func:`sklearn.metrics.calinski_harabasz_score`. Latents that are all identical give 0 and 1
        (scikit-learn's values for that case).

    Raises:
        ValueError: when the latents are not at least 2-D or contain nan/inf, the lengths differ, or the number of
            batches is not between 2 and ``N - 1``.

    Example::

        scores = latent_cluster_scores(fixed_effects_latents, dates)
        scores["davies_bouldin"], scores["calinski_harabasz"]
    """
    x = convert_to_numpy(latents, np.float64, wrap_sequence=True)
    if x.ndim < 2:
        raise ValueError(f"latents must have shape (N, D), got {x.shape}.")
    x = x.reshape(x.shape[0], -1)
    labels = _labels(clusters, x.shape[0], "latents")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"latents must be finite, found {_count_non_finite(x)} values.")
    n_clusters = np.unique(labels).size
    if n_clusters < 2:
        raise ValueError(f"need at least 2 clusters (batches) to score the latents, got {n_clusters}.")
    if n_clusters >= x.shape[0]:
        raise ValueError(
            f"need fewer clusters than samples to score the latents, got {n_clusters} clusters for {x.shape[0]} samples."
        )
    if standardize:
        x = StandardScaler().fit_transform(x)
    return {
        "davies_bouldin": float(davies_bouldin_score(x, labels)),
        "calinski_harabasz": float(calinski_harabasz_score(x, labels)),
    }


def _single_channel_images(images: ArrayLike) -> np.ndarray:
    """``(N, *spatial)`` float64 images from ``(N, H, W)``, ``(N, 1, H, W)`` or ``(N, 1, H, W, D)``."""
    x = convert_to_numpy(images, np.float64, wrap_sequence=True)
    if x.ndim == 3:
        return x
    if x.ndim in (4, 5) and x.shape[1] == 1:
        return x[:, 0]
    raise ValueError(f"images must have shape (N, H, W), (N, 1, H, W) or (N, 1, H, W, D) (one channel), got {x.shape}.")


def image_quality_metrics(images: ArrayLike) -> dict[str, np.ndarray]:
    """
    Brightness, contrast, sharpness and signal-to-noise ratio of each image (reference §5.8).

    * ``brightness``: mean intensity.
    * ``contrast``: standard deviation of the intensities (population s.d., ``ddof=0``).
    * ``sharpness``: variance of the Laplacian (:func:`scipy.ndimage.laplace`, computed within each image with
      mirrored borders, the default border of OpenCV's ``cv2.Laplacian`` used by the authors).
    * ``snr``: brightness / contrast; ``nan`` for an image with zero s.d. (a constant image has no defined SNR).

    The values depend on the intensity scale, so compare images on the same scale (e.g. ``[0, 1]``).

    Args:
        images: ``(N, H, W)`` or ``(N, 1, H, W)`` 2-D images, or ``(N, 1, H, W, D)`` volumes.

    Returns:
        ``{"brightness", "contrast", "sharpness", "snr"}``, each an ``(N,)`` float64 array.

    Raises:
        ValueError: for another shape (e.g. several channels) or no images.

    Example::

        metrics = image_quality_metrics(reconstructions)          # (N, 1, 256, 256) in [0, 1]
        anova_f_by_cluster(metrics, dates)
    """
    x = _single_channel_images(images)
    if x.shape[0] == 0:
        raise ValueError("images is empty: expected at least one image.")
    spatial_axes = tuple(range(1, x.ndim))
    brightness = x.mean(axis=spatial_axes)
    contrast = x.std(axis=spatial_axes)
    # One image at a time: a Laplacian of the whole stack would also differentiate across the batch axis.
    sharpness = np.array([ndimage.laplace(image, mode="mirror").var() for image in x])
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.where(contrast > 0, brightness / contrast, np.nan)
    return {"brightness": brightness, "contrast": contrast, "sharpness": sharpness, "snr": snr}


def _anova_f(values: np.ndarray, labels: np.ndarray, min_samples: int) -> float:
    """F of the finite ``values`` across the batches holding at least ``min_samples`` of them; nan below 2 batches."""
    finite = np.isfinite(values)
    values, labels = values[finite], labels[finite]
    groups = [values[labels == batch] for batch in np.unique(labels)]
    groups = [group for group in groups if group.size >= min_samples]
    if len(groups) < 2:
        return float("nan")
    with warnings.catch_warnings():
        # Constant groups make scipy warn; its inf/nan result is the documented answer.
        warnings.simplefilter("ignore")
        return float(f_oneway(*groups).statistic)


def anova_f_by_cluster(
    values: Mapping[str, ArrayLike] | ArrayLike, clusters: ArrayLike, min_samples: int = 2
) -> dict[str, float]:
    """
    One-way ANOVA F statistic (:func:`scipy.stats.f_oneway`) of per-image values across batches, per metric.

    Lower F means the batches differ less, i.e. less batch effect in, e.g., the reconstructions' image metrics.
    For each metric, non-finite values (e.g. the ``nan`` SNR of a constant image) are dropped first and batches
    with fewer than ``min_samples`` remaining values are left out (a batch needs 2 to have a variance).

    Args:
        values: ``{metric name: (N,) values}`` such as the output of :func:`image_quality_metrics`, or a single
            ``(N,)`` array (the result is then keyed ``"value"``).
        clusters: ``(N,)`` batch labels (integers or strings).
        min_samples: smallest number of values a batch needs to take part (at least 2).

    Returns:
        ``{metric name: F}``. F is ``nan`` when fewer than 2 batches take part or all values are equal, and
        ``inf`` when the batch means differ but every batch is constant.

    Raises:
        ValueError: when a metric's values are not ``(N,)`` matching ``clusters`` (the message names the metric),
            or ``min_samples < 2``.

    Example::

        anova_f_by_cluster(image_quality_metrics(recon), dates)   # {"brightness": 3.1, "contrast": 0.8, ...}
    """
    if min_samples < 2:
        raise ValueError(f"min_samples must be at least 2 (a batch needs a variance), got {min_samples}.")
    metrics = dict(values) if isinstance(values, Mapping) else {_SINGLE_KEY: values}
    labels = convert_to_numpy(clusters, wrap_sequence=True)
    result = {}
    for name, metric in metrics.items():
        array = convert_to_numpy(metric, np.float64, wrap_sequence=True)
        if array.ndim != 1:
            raise ValueError(f"values[{name!r}] must be a 1-D array (N,), got shape {array.shape}.")
        result[str(name)] = _anova_f(array, _labels(labels, array.shape[0], f"values[{name!r}]"), min_samples)
    return result


def reconstruction_mse(images: ArrayLike, reconstructions: ArrayLike, reduction: str = "none") -> np.ndarray | float:
    """
    Mean squared error between images and their reconstructions.

    Args:
        images: ``(N, *dims)`` original images.
        reconstructions: reconstructions of the same shape.
        reduction: ``"none"`` for the ``(N,)`` per-image MSE, ``"mean"`` for the MSE over all pixels of all images.

    Returns:
        an ``(N,)`` float64 array, or a float for ``"mean"``.

    Raises:
        ValueError: for an unknown ``reduction``, differing shapes or no images.

    Example::

        reconstruction_mse(x, x_hat, reduction="mean")    # e.g. 0.0012
    """
    if reduction not in ("none", "mean"):
        raise ValueError(f"reduction must be 'none' or 'mean', got {reduction!r}.")
    x = convert_to_numpy(images, np.float64, wrap_sequence=True)
    y = convert_to_numpy(reconstructions, np.float64, wrap_sequence=True)
    if x.shape != y.shape:
        raise ValueError(f"images and reconstructions differ in shape: {x.shape} vs {y.shape}.")
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"images must be a non-empty batch (N, *dims), got shape {x.shape}.")
    per_image = np.square(x - y).reshape(x.shape[0], -1).mean(axis=1)
    return per_image if reduction == "none" else float(per_image.mean())
