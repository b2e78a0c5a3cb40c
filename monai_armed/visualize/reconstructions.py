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
Figures of autoencoder outputs by batch (reference §5.7-5.8): example reconstructions of each batch by the
fixed-effects and mixed-effects decoders, and 2-D embeddings of the latents coloured by batch and by phenotype.

Figures are drawn on their own :class:`matplotlib.figure.Figure` (Agg canvas, no ``pyplot`` state) and written
atomically by :func:`~monai_armed.visualize.figures.save_figure`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from monai.utils import convert_to_numpy
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE

from monai_armed.visualize.figures import save_figure

__all__ = ["save_reconstruction_grid", "save_latent_embedding"]

ArrayLike = np.ndarray | torch.Tensor | Sequence
_METHODS = ("pca", "tsne")
_LEGEND_ROWS = 15


def _label_array(values: ArrayLike, n: int, name: str) -> np.ndarray:
    """``(N,)`` labels named ``name``, checked to hold ``n`` entries."""
    array = convert_to_numpy(values, wrap_sequence=True)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1 or array.shape[0] != n:
        raise ValueError(f"{name} must be a 1-D array of {n} labels (one per sample), got shape {array.shape}.")
    return array


def _display_name(value: object, names: Sequence[str] | None, what: str) -> str:
    """Name of one label: ``names[value]`` for an integer index (``1.0`` counts as 1), else ``str(value)``.

    A negative cluster index is named ``"unseen"`` (the cluster vocabulary's index for clusters not seen in training).
    """
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if value < 0:
            if what == "cluster":
                return "unseen"
            return str(value)
        if names is not None:
            if value >= len(names):
                raise ValueError(f"{what} index {int(value)} has no name: {what}_names holds {len(names)}.")
            return str(names[value])
    return str(value)


def _planes(images: ArrayLike, name: str) -> np.ndarray:
    """``(N, H, W)`` float32 planes of ``(N, H, W)``, ``(N, 1, H, W)`` or ``(N, 1, H, W, D)`` (middle slice)."""
    x = convert_to_numpy(images, np.float32, wrap_sequence=True)
    if x.ndim == 3:
        return x
    if x.ndim == 4 and x.shape[1] == 1:
        return x[:, 0]
    if x.ndim == 5 and x.shape[1] == 1:
        return x[:, 0, ..., x.shape[-1] // 2]
    raise ValueError(f"{name} must have shape (N, H, W), (N, 1, H, W) or (N, 1, H, W, D) (one channel), got {x.shape}.")


def _rows_by_cluster(clusters: np.ndarray, per_cluster: int, max_clusters: int) -> list[tuple[object, list[int]]]:
    """``(cluster, sample indices)`` of the first ``max_clusters`` clusters (sorted), at most ``per_cluster`` each."""
    rows = []
    for cluster in np.unique(clusters)[:max_clusters]:
        rows.append((cluster.item(), np.flatnonzero(clusters == cluster)[:per_cluster].tolist()))
    return rows


def _hide_ticks(ax: Axes) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def save_reconstruction_grid(
    images: ArrayLike,
    recon_fe: ArrayLike,
    recon_me: ArrayLike | None,
    clusters: ArrayLike,
    path: str | os.PathLike,
    cluster_names: Sequence[str] | None = None,
    per_cluster: int = 1,
    max_clusters: int = 8,
) -> Path:
    """
    PNG grid of example reconstructions, one row per example, grouped by batch.

    Columns: the original image, the fixed-effects reconstruction, the mixed-effects reconstruction and their
    difference (mixed - fixed) on a diverging colour map centred at 0 with symmetric limits shared by all rows (red
    where the random effects brighten the image, blue where they darken it). The three images of a row share one
    grey scale. Without ``recon_me`` (a fixed-effects-only model) only the first two columns are drawn.

    Args:
        images: ``(N, H, W)`` or ``(N, 1, H, W)`` originals; ``(N, 1, H, W, D)`` volumes show their middle slice.
        recon_fe: fixed-effects reconstructions, same shape as ``images``.
        recon_me: mixed-effects reconstructions, same shape, or ``None``.
        clusters: ``(N,)`` batch labels (integer indices, ``-1`` = unseen, or strings).
        path: output PNG path (written atomically; parent directories are created).
        cluster_names: names of the integer batch indices (e.g. the imaging dates), used in the titles.
        per_cluster: examples per batch (the first ones of each batch).
        max_clusters: at most this many batches (the first in sorted order) are drawn.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: when the shapes do not match, ``clusters`` has another length, a batch index has no name, or
            ``per_cluster`` / ``max_clusters`` is below 1.

    Example::

        save_reconstruction_grid(x, x_hat_fe, x_hat_me, dates, "eval/reconstructions.png",
                                 cluster_names=vocabulary.clusters, per_cluster=2)
    """
    if per_cluster < 1 or max_clusters < 1:
        raise ValueError(f"per_cluster and max_clusters must be at least 1, got {per_cluster} and {max_clusters}.")
    originals = _planes(images, "images")
    columns = {"original": originals}
    for column, argument, value in (("fixed effects", "recon_fe", recon_fe), ("mixed effects", "recon_me", recon_me)):
        if value is None:
            continue
        columns[column] = _planes(value, argument)
        if columns[column].shape != originals.shape:
            raise ValueError(
                f"{argument} has shape {tuple(np.shape(value))}, expected the shape of images "
                f"{tuple(np.shape(images))}."
            )
    labels = _label_array(clusters, originals.shape[0], "clusters")
    rows = [
        (_display_name(cluster, cluster_names, "cluster"), index)
        for cluster, indices in _rows_by_cluster(labels, per_cluster, max_clusters)
        for index in indices
    ]
    difference = columns["mixed effects"] - columns["fixed effects"] if recon_me is not None else None
    if difference is not None:
        limit = float(np.nanmax(np.abs(difference[[index for _, index in rows]])))
        limit = limit if 0 < limit < np.inf else 1.0  # identical reconstructions: any symmetric range shows zeros

    n_cols = len(columns) + (difference is not None)
    fig = Figure(figsize=(2.4 * n_cols + 0.6, 2.4 * len(rows) + 0.8), layout="constrained")
    axes = fig.subplots(len(rows), n_cols, squeeze=False)
    for row, (batch, index) in zip(axes, rows):
        shown = [planes[index] for planes in columns.values()]
        low, high = min(float(p.min()) for p in shown), max(float(p.max()) for p in shown)
        for ax, (column, plane) in zip(row, zip(columns, shown)):
            ax.imshow(plane, cmap="gray", vmin=low, vmax=high)
            ax.set_title(f"{batch}: {column}" if column == "original" else column, fontsize=9)
        if difference is not None:
            diff_image = row[-1].imshow(difference[index], cmap="RdBu_r", vmin=-limit, vmax=limit)
            row[-1].set_title("mixed - fixed", fontsize=9)
        for ax in row:
            _hide_ticks(ax)
    if difference is not None:
        fig.colorbar(diff_image, ax=list(axes[:, -1]), location="bottom", shrink=0.9, label="mixed - fixed")
    fig.suptitle("Reconstructions by batch")
    return Path(save_figure(fig, path))


def _embed(latent: np.ndarray, method: str, seed: int) -> tuple[np.ndarray, tuple[str, str]]:
    """``(N, 2)`` embedding of ``(N, D)`` latents and the two axis labels."""
    if method == "tsne":
        perplexity = min(30.0, (latent.shape[0] - 1) / 3.0)
        points = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(latent)
        return points, ("t-SNE 1", "t-SNE 2")
    n_components = min(2, latent.shape[1])
    pca = PCA(n_components=n_components, random_state=seed)
    points = pca.fit_transform(latent)
    if n_components == 1:  # a 1-D latent: draw it along the first axis
        points = np.concatenate([points, np.zeros_like(points)], axis=1)
    ratio = list(pca.explained_variance_ratio_) + [0.0]
    return points, (f"PC 1 ({100 * ratio[0]:.0f}%)", f"PC 2 ({100 * ratio[1]:.0f}%)")


def _scatter_by(
    ax: Axes, points: np.ndarray, labels: np.ndarray, names: Sequence[str] | None, what: str, title: str
) -> None:
    """Scatter ``points`` with one colour and legend entry per distinct label (named via ``{what}_names``)."""
    groups = np.unique(labels)
    colours = matplotlib.colormaps["tab10" if groups.size <= 10 else "tab20"]
    for i, group in enumerate(groups):
        keep = labels == group
        ax.scatter(
            points[keep, 0],
            points[keep, 1],
            s=8,
            alpha=0.7,
            color=colours(i % colours.N),
            label=_display_name(group.item(), names, what),
        )
    ax.legend(
        title=title,
        fontsize=7,
        title_fontsize=8,
        markerscale=1.5,
        loc="center left",
        bbox_to_anchor=(1.01, 0.5),
        ncols=math.ceil(groups.size / _LEGEND_ROWS),
    )


def save_latent_embedding(
    latents: Mapping[str, ArrayLike],
    clusters: ArrayLike,
    labels: ArrayLike,
    path: str | os.PathLike,
    cluster_names: Sequence[str] | None = None,
    label_names: Sequence[str] | None = None,
    method: str = "pca",
    seed: int = 0,
) -> Path:
    """
    PNG of 2-D embeddings of one or more latent representations, coloured by batch and by phenotype.

    One row per latent (e.g. ``{"fixed effects": e_F, "random effects": e_R}``) with two panels: the samples
    coloured by batch and coloured by label. A good fixed-effects latent mixes the batches and separates the labels;
    a random-effects latent is meant to separate the batches.

    Args:
        latents: ``{name: (N, D) latents}``; ``(N, *dims)`` arrays are flattened.
        clusters: ``(N,)`` batch labels (integer indices, ``-1`` = unseen, or strings).
        labels: ``(N,)`` phenotype labels (e.g. 0 = high, 1 = low metastatic efficiency).
        path: output PNG path (written atomically; parent directories are created).
        cluster_names: names of the integer batch indices, for the legend.
        label_names: names of the integer labels, for the legend.
        method: ``"pca"`` (:class:`sklearn.decomposition.PCA`, axes give the explained variance) or ``"tsne"``
            (:class:`sklearn.manifold.TSNE`, slower, perplexity ``min(30, (N - 1) / 3)``).
        seed: random state of the embedding.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: for an empty ``latents``, an unknown ``method``, fewer than 2 samples (4 for t-SNE), a latent
            with nan/inf or another number of samples (the message names the latent), or a label without a name.

    Example::

        save_latent_embedding({"fixed effects": e_f, "random effects": e_r}, dates, labels,
                              "eval/latents_pca.png", cluster_names=vocabulary.clusters, label_names=["high", "low"])
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {list(_METHODS)}, got {method!r}.")
    if len(latents) == 0:
        raise ValueError("latents is empty: expected at least one {name: (N, D) array}.")
    arrays = {}
    for name, latent in latents.items():
        array = convert_to_numpy(latent, np.float64, wrap_sequence=True)
        if array.ndim < 2:
            raise ValueError(f"latents[{name!r}] must have shape (N, D), got {array.shape}.")
        array = array.reshape(array.shape[0], -1)
        if not np.all(np.isfinite(array)):
            raise ValueError(f"latents[{name!r}] must be finite, found {int((~np.isfinite(array)).sum())} nan/inf.")
        arrays[str(name)] = array
    n = next(iter(arrays.values())).shape[0]
    for name, array in arrays.items():
        if array.shape[0] != n:
            raise ValueError(f"latents[{name!r}] has {array.shape[0]} samples, expected {n} like the first latent.")
    if n < (4 if method == "tsne" else 2):
        raise ValueError(f"need at least {4 if method == 'tsne' else 2} samples for a {method} embedding, got {n}.")
    batches = _label_array(clusters, n, "clusters")
    phenotypes = _label_array(labels, n, "labels")

    fig = Figure(figsize=(11.0, 4.2 * len(arrays) + 0.5), layout="constrained")
    axes = fig.subplots(len(arrays), 2, squeeze=False)
    for row, (name, array) in zip(axes, arrays.items()):
        points, (xlabel, ylabel) = _embed(array, method, seed)
        _scatter_by(row[0], points, batches, cluster_names, "cluster", "batch")
        _scatter_by(row[1], points, phenotypes, label_names, "label", "label")
        row[0].set_title(f"{name}: coloured by batch")
        row[1].set_title(f"{name}: coloured by label")
        for ax in row:
            ax.set(xlabel=xlabel, ylabel=ylabel)
    fig.suptitle(f"Latent embedding ({'PCA' if method == 'pca' else 't-SNE'})")
    return Path(save_figure(fig, path))
