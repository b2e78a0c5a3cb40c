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
Synthetic spiral data sets from the ARMED paper (Nguyen et al., "Adversarially-regularized mixed effects
deep learning (ARMED) models improve interpretability, performance, and generalization on clustered
(non-iid) data", IEEE TPAMI 2023).

All generators draw from numpy's legacy global random state (``np.random``) in a fixed order, so that
calling ``np.random.seed(...)`` first reproduces the authors' data sets exactly.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

__all__ = [
    "make_spirals",
    "make_spiral_random_radius",
    "make_spiral_random_radius_confounder",
    "make_spiral_random_slope",
    "make_spiral_true_boundary",
    "spirals_to_datalist",
]


def _spiral_arm(t: np.ndarray, phase: float, radius: float) -> np.ndarray:
    """Noise-free spiral coordinates for angles ``t`` (radians), rotated by ``phase``, scaled to ``radius``.

    Angles that are all 0 (a class of one point drew the arm's start) put the points at the centre, not at 0 / 0.
    """
    top = np.max(t)
    scale = t * radius / top if top > 0 else np.zeros_like(t)
    return np.stack([-np.cos(t - phase) * scale, np.sin(t - phase) * scale], axis=1)


def _points_per_class(points: int, classes: int) -> list[int]:
    """Split ``points`` evenly across ``classes``; the last class takes the remainder."""
    per_class = points // classes
    return [per_class] * (classes - 1) + [points - per_class * (classes - 1)]


def make_spirals(
    points: int = 1000, classes: int = 2, degrees: float = 360, radius: float = 1, noise: float = 0
) -> tuple[np.ndarray, np.ndarray]:
    """
    Generate interleaved spiral arms, one per class.

    Each class ``k`` gets angles drawn uniformly from the integers ``[0, degrees)`` (in degrees), an arm
    rotated by ``2 * pi * k / classes`` and scaled so its farthest point lies at ``radius``, plus isotropic
    Gaussian noise. The noise is drawn even when ``noise == 0`` so that the random stream is consumed
    identically.

    Args:
        points: total number of points. Each class gets ``points // classes``; the last class also gets
            the remainder.
        classes: number of spiral arms (classes).
        degrees: angular extent of each arm in degrees.
        radius: radius of the outermost point of each arm (before noise).
        noise: standard deviation of the additive Gaussian noise.

    Returns:
        ``(X, Y)``: coordinates of shape ``(points, 2)`` and one-hot labels of shape ``(points, classes)``,
        ordered by class.

    Example::

        np.random.seed(48)
        X, Y = make_spirals(points=1000, classes=2, noise=0.1)
        X.shape, Y.shape  # ((1000, 2), (1000, 2))
    """
    xs, ys = [], []
    for k, n_k in enumerate(_points_per_class(points, classes)):
        t = np.random.randint(0, degrees, size=n_k) * np.pi / 180
        arm = _spiral_arm(t, 2 * np.pi * k / classes, radius)
        xs.append(arm + np.random.normal(scale=noise, size=(n_k, 2)))
        y = np.zeros((n_k, classes))
        y[:, k] = 1
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def _one_hot_block(n: int, column: int, width: int) -> np.ndarray:
    """An ``(n, width)`` array that is 1 in ``column`` and 0 elsewhere."""
    block = np.zeros((n, width))
    block[:, column] = 1
    return block


def make_spiral_random_radius(
    clusters: int,
    points_per_cluster: int = 1000,
    mean_radius: float = 1.0,
    inter_cluster_sd: float = 0.2,
    classes: int = 2,
    degrees: float = 360,
    noise: float = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """
    Generate clustered spirals where each cluster has its own random radius (a random effect).

    The cluster radii are drawn first from ``N(mean_radius, inter_cluster_sd)``, then each cluster's
    spirals are drawn with :func:`make_spirals`.

    Args:
        clusters: number of clusters.
        points_per_cluster: points in each cluster (split across classes as in :func:`make_spirals`).
        mean_radius: mean of the cluster radii.
        inter_cluster_sd: standard deviation of the cluster radii.
        classes: number of classes (spiral arms).
        degrees: angular extent of each arm in degrees.
        noise: standard deviation of the additive Gaussian noise.

    Returns:
        ``(X, Z, Y, radii)``: coordinates ``(C * P, 2)``, one-hot cluster membership ``(C * P, C)``,
        one-hot labels ``(C * P, classes)`` and the cluster radii ``(C,)``.

    Example::

        np.random.seed(48)
        X, Z, Y, radii = make_spiral_random_radius(10, mean_radius=1, inter_cluster_sd=0.3, noise=0.1)
        X.shape, Z.shape, Y.shape, radii.shape  # ((10000, 2), (10000, 10), (10000, 2), (10,))
    """
    radii = np.random.normal(mean_radius, inter_cluster_sd, size=clusters)
    xs, zs, ys = [], [], []
    for c in range(clusters):
        x, y = make_spirals(points_per_cluster, classes, degrees, radius=radii[c], noise=noise)
        xs.append(x)
        ys.append(y)
        zs.append(_one_hot_block(points_per_cluster, c, clusters))
    return np.concatenate(xs), np.concatenate(zs), np.concatenate(ys), radii


def make_spiral_random_radius_confounder(
    clusters: int,
    points_per_cluster: int = 1000,
    mean_radius: float = 1.0,
    radius_sd: float = 0.2,
    ratio_sd: float = 0.2,
    degrees: float = 360,
    noise: float = 0,
    confounders: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """
    Generate clustered two-class spirals with a cluster-dependent class ratio and confounding probes.

    Each cluster has a random radius and a random fraction of class-0 points (``ratio``, clipped to
    ``[0.1, 0.9]``). Every point also carries ``confounders`` extra features drawn from
    ``N(ratio, 0.2)``: they predict the cluster's class balance, hence the label, without carrying
    any information about the spiral itself.

    Args:
        clusters: number of clusters.
        points_per_cluster: points in each cluster.
        mean_radius: mean of the cluster radii.
        radius_sd: standard deviation of the cluster radii.
        ratio_sd: standard deviation of the cluster class-0 fractions around 0.5.
        degrees: angular extent of each arm in degrees.
        noise: standard deviation of the additive Gaussian noise on the spiral coordinates.
        confounders: number of confounding probe features appended to the coordinates.

    Returns:
        ``(X, Z, Y, radii, ratios)``: features ``(C * P, 2 + confounders)`` (coordinates then probes),
        one-hot cluster membership ``(C * P, C)``, one-hot labels ``(C * P, 2)``, the cluster radii
        ``(C,)`` and the cluster class-0 fractions ``(C,)``.

    Example::

        np.random.seed(48)
        X, Z, Y, radii, ratios = make_spiral_random_radius_confounder(10, radius_sd=0.3, confounders=5)
        X.shape  # (10000, 7)
    """
    radii = np.random.normal(mean_radius, radius_sd, size=clusters)
    ratios = np.clip(np.random.normal(0.5, ratio_sd, size=clusters), 0.1, 0.9)
    xs, zs, ys = [], [], []
    for c in range(clusters):
        x, y = make_spirals(2 * points_per_cluster, 2, degrees, radius=radii[c], noise=noise)
        n0 = int(points_per_cluster * ratios[c])
        keep = np.concatenate([np.flatnonzero(y[:, 0])[:n0], np.flatnonzero(y[:, 1])[: points_per_cluster - n0]])
        probes = np.random.normal(ratios[c], 0.2, size=(points_per_cluster, confounders))
        xs.append(np.concatenate([x[keep], probes], axis=1))
        ys.append(y[keep])
        zs.append(_one_hot_block(points_per_cluster, c, clusters))
    return np.concatenate(xs), np.concatenate(zs), np.concatenate(ys), radii, ratios


def make_spiral_random_slope(
    clusters: int,
    points_per_cluster: int = 1000,
    slope_sd: float = 0.2,
    classes: int = 2,
    degrees: float = 360,
    noise: float = 0,
    radius: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """
    Generate clustered spirals where each cluster is squashed along ``x2`` by a random slope.

    The slopes ``s_c`` are drawn first from ``N(0, slope_sd)``; each cluster's ``x2`` coordinate is then
    divided by ``s_c + 1`` (plus a tiny constant that keeps the division finite).

    Args:
        clusters: number of clusters.
        points_per_cluster: points in each cluster (split across classes as in :func:`make_spirals`).
        slope_sd: standard deviation of the cluster slopes.
        classes: number of classes (spiral arms).
        degrees: angular extent of each arm in degrees.
        noise: standard deviation of the additive Gaussian noise.
        radius: radius of the outermost point of each arm.

    Returns:
        ``(X, Z, Y, slopes)``: coordinates ``(C * P, 2)``, one-hot cluster membership ``(C * P, C)``,
        one-hot labels ``(C * P, classes)`` and the cluster slopes ``(C,)``.

    Example::

        np.random.seed(48)
        X, Z, Y, slopes = make_spiral_random_slope(10, slope_sd=0.2, noise=0.1)
    """
    slopes = np.random.normal(0, slope_sd, size=clusters)
    xs, zs, ys = [], [], []
    for c in range(clusters):
        x, y = make_spirals(points_per_cluster, classes, degrees, radius=radius, noise=noise)
        x[:, 1] = x[:, 1] / (slopes[c] + 1 + 1e-7)
        xs.append(x)
        ys.append(y)
        zs.append(_one_hot_block(points_per_cluster, c, clusters))
    return np.concatenate(xs), np.concatenate(zs), np.concatenate(ys), slopes


def make_spiral_true_boundary(classes: int = 2, degrees: float = 360, radius: float = 1) -> np.ndarray:
    """
    Approximate the ideal decision boundary between the class-0 and class-1 spiral arms.

    The two noise-free arms are traced densely over ``1.5 * degrees`` and scaled to ``1.5 * radius``, so
    the boundary extends past the data. For every class-0 point, the midpoint to its nearest class-1
    point lies on the boundary; the point reflections of these midpoints trace the boundary's other
    branch. No random numbers are drawn.

    Pass the data's own ``degrees``: the traced arms then wind as the data's do, and the boundary runs midway
    between them. The authors' notebook passes ``degrees - 180``, whose arms wind twice as fast, so its "boundary"
    lies on the class-0 arm and crosses the class-1 arm; that call is not copied here.

    Args:
        classes: number of classes the arms are spaced for (the arm phase is ``2 * pi * k / classes``).
        degrees: angular extent of the data's arms in degrees; the traced arms extend to ``1.5 * degrees``.
        radius: radius of the data's arms.

    Returns:
        boundary points of shape ``(2000, 2)``: the 1000 midpoints followed by their reflections.

    Example::

        boundary = make_spiral_true_boundary(degrees=360)   # the degrees of make_spirals
        boundary.shape  # (2000, 2)
    """
    t = np.deg2rad(np.linspace(0, 1.5 * degrees, 1000))
    arm0 = _spiral_arm(t, 0.0, 1.5 * radius)
    arm1 = _spiral_arm(t, 2 * np.pi / classes, 1.5 * radius)
    _, nearest = cKDTree(arm1).query(arm0)
    midpoints = (arm0 + arm1[nearest]) / 2
    return np.concatenate([midpoints, -midpoints])


def _as_indices(values: np.ndarray) -> np.ndarray:
    """Integer indices from one-hot rows (argmax) or from an integer vector (unchanged)."""
    values = np.asarray(values)
    return np.argmax(values, axis=1) if values.ndim == 2 else values.astype(np.int64)


def spirals_to_datalist(X: np.ndarray, Z: np.ndarray, Y: np.ndarray) -> list[dict]:
    """
    Convert spiral arrays into a MONAI-style datalist.

    Args:
        X: features of shape ``(N, F)``.
        Z: cluster membership, one-hot ``(N, C)`` or integer ``(N,)``.
        Y: labels, one-hot ``(N, K)`` or integer ``(N,)``.

    Returns:
        one dict per point: ``{"features": float32 array (F,), "label": int, "cluster": int}``.

    Example::

        np.random.seed(48)
        X, Z, Y, _ = make_spiral_random_radius(10)
        datalist = spirals_to_datalist(X, Z, Y)
        datalist[0]["features"].shape  # (2,)
    """
    features = np.asarray(X, dtype=np.float32)
    labels, clusters = _as_indices(Y), _as_indices(Z)
    if not len(features) == len(labels) == len(clusters):
        raise ValueError(
            f"X, Z and Y must have the same length, got {len(features)}, {len(clusters)} and {len(labels)}."
        )
    return [
        {"features": f, "label": int(label), "cluster": int(cluster)}
        for f, label, cluster in zip(features, labels, clusters)
    ]
