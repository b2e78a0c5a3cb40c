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
Figures for ARMED experiments: decision boundaries per cluster, random intercepts against class balance,
feature importance and the spread of the learned random effects.

Every plotting function draws on its own :class:`matplotlib.figure.Figure` with the Agg canvas (no global
``pyplot`` state), writes a PNG to ``path`` (creating parent directories) and returns ``path`` as a string.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.contour import QuadContourSet
from matplotlib.figure import Figure

__all__ = [
    "save_figure",
    "plot_decision_boundaries",
    "plot_intercepts_vs_balance",
    "intercept_balance_correlation",
    "plot_feature_importance",
    "plot_random_effect_spread",
    "feature_importance",
]

PredictFn = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
_CMAP = "RdBu_r"
_FIXED = -1


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> str:
    """
    Write ``fig`` as a PNG to ``path`` atomically, release its contents and return the path as a string.

    The PNG goes to a uniquely named temporary file beside ``path`` that then replaces it, so ``path`` never holds
    a partial image and an existing file survives a failed write. Parent directories are created.

    Example::

        fig = Figure()
        fig.subplots().plot([0, 1], [1, 0])
        save_figure(fig, "out/line.png")
    """
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    FigureCanvasAgg(fig)
    try:
        fig.savefig(tmp, format="png", dpi=dpi)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    finally:
        fig.clear()
    return path


def _names(names: Sequence[str] | None, count: int, prefix: str) -> list[str]:
    """``names`` as a list of ``count`` strings, or ``"{prefix}{i}"`` when ``names`` is None."""
    if names is None:
        return [f"{prefix}{i}" for i in range(count)]
    if len(names) != count:
        raise ValueError(f"expected {count} names, got {len(names)}.")
    return [str(n) for n in names]


def _grid(x_range: tuple[float, float], y_range: tuple[float, float], step: float) -> tuple[np.ndarray, np.ndarray]:
    """Mesh coordinates ``(xx, yy)`` covering both ranges (end points included) at spacing ``step``."""
    if step <= 0:
        raise ValueError(f"step must be positive, got {step}.")
    xs = np.arange(x_range[0], x_range[1] + step / 2, step)
    ys = np.arange(y_range[0], y_range[1] + step / 2, step)
    return np.meshgrid(xs, ys)


def _grid_features(xx: np.ndarray, yy: np.ndarray, extra_features: Sequence[float]) -> torch.Tensor:
    """``(N, 2 + E)`` float32 inputs: the flattened mesh followed by the constant extra features."""
    coords = np.stack([xx.ravel(), yy.ravel()], axis=1)
    extra = np.broadcast_to(np.asarray(extra_features, dtype=np.float64), (coords.shape[0], len(extra_features)))
    return torch.as_tensor(np.concatenate([coords, extra], axis=1), dtype=torch.float32)


def _cluster_tensor(cluster: int | None, n: int) -> torch.Tensor | None:
    """``None`` for fixed effects (``None`` or ``-1``), else an ``(n,)`` int64 tensor filled with ``cluster``."""
    if cluster is None or cluster == _FIXED:
        return None
    return torch.full((n,), int(cluster), dtype=torch.int64)


def _predict_grid(predict_fn: PredictFn, features: torch.Tensor, cluster: int, shape: tuple[int, ...]) -> np.ndarray:
    """Class-1 probabilities of ``predict_fn`` on the whole grid in a single call, reshaped to ``shape``."""
    with torch.no_grad():
        prob = predict_fn(features, _cluster_tensor(cluster, features.shape[0]))
    return torch.as_tensor(prob).detach().cpu().float().numpy().reshape(shape)


def _draw_points(ax: Axes, points: tuple[np.ndarray, np.ndarray, np.ndarray], cluster: int) -> None:
    """Scatter the points of ``cluster`` (all points for fixed effects), coloured by their label."""
    x, y, c = (np.asarray(a) for a in points)
    keep = np.ones(len(c), dtype=bool) if cluster == _FIXED else c == cluster
    ax.scatter(x[keep, 0], x[keep, 1], c=y[keep], cmap=_CMAP, vmin=0, vmax=1, s=9, edgecolors="w", linewidths=0.4)


def _draw_panel(
    ax: Axes,
    xx: np.ndarray,
    yy: np.ndarray,
    prob: np.ndarray,
    title: str,
    points: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
    true_boundary: np.ndarray | None,
    cluster: int,
) -> QuadContourSet:
    """Draw one decision-boundary panel and return its filled contour set (for the shared colour bar)."""
    filled = ax.contourf(xx, yy, prob, levels=np.linspace(0, 1, 11), cmap=_CMAP, vmin=0, vmax=1, alpha=0.6)
    if prob.min() < 0.5 < prob.max():
        ax.contour(xx, yy, prob, levels=[0.5], colors="k", linewidths=1.2)
    if points is not None:
        _draw_points(ax, points, cluster)
    if true_boundary is not None:
        boundary = np.asarray(true_boundary)
        ax.plot(boundary[:, 0], boundary[:, 1], "k.", markersize=1, label="true boundary")
    ax.set(title=title, xlim=(xx.min(), xx.max()), ylim=(yy.min(), yy.max()), aspect="equal")
    return filled


def _panel_title(cluster: int, cluster_names: Sequence[str] | None) -> str:
    """Panel title: ``"fixed effects"`` for ``-1``, else the cluster's name (or ``"cluster i"``)."""
    if cluster == _FIXED:
        return "fixed effects"
    return str(cluster_names[cluster]) if cluster_names is not None else f"cluster {cluster}"


def plot_decision_boundaries(
    predict_fn: PredictFn,
    clusters: Sequence[int],
    path: str | os.PathLike,
    x_range: tuple[float, float] = (-2.0, 2.0),
    y_range: tuple[float, float] | None = None,
    step: float = 0.02,
    points: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    true_boundary: np.ndarray | Mapping[int, np.ndarray] | None = None,
    cluster_names: Sequence[str] | None = None,
    extra_features: Sequence[float] | None = None,
    ncols: int = 5,
    title: str | None = None,
) -> str:
    """
    Plot the predicted class-1 probability over a 2-D grid, one panel per cluster.

    ``predict_fn`` is called once per panel, under :func:`torch.no_grad`, on the whole grid. Each panel shows
    the filled probability map, the 0.5 contour, optionally the data points of that cluster (coloured by
    label) and a reference ("true") boundary drawn as black dots. All panels share one colour bar.

    Args:
        predict_fn: ``predict_fn(features, cluster) -> prob`` with ``features`` a float32 ``(N, F)`` tensor,
            ``cluster`` an int64 ``(N,)`` tensor, or ``None`` for the fixed-effects panel, and ``prob`` the
            ``(N,)`` probability of class 1.
        clusters: cluster indices, one panel each; ``-1`` gives a "fixed effects" panel (``cluster=None``).
        path: output PNG path; parent directories are created.
        x_range: ``(min, max)`` of the first feature.
        y_range: ``(min, max)`` of the second feature; defaults to ``x_range``.
        step: grid spacing.
        points: optional ``(X (M, 2), y (M,), cluster (M,))``; each panel shows the points of its cluster
            (the fixed-effects panel shows all of them).
        true_boundary: optional ``(K, 2)`` points on the reference boundary, drawn on every panel, or a mapping
            ``{cluster: (K, 2) points}`` when each cluster has its own (panels without an entry show none).
        cluster_names: optional names indexed by cluster index, used as panel titles.
        extra_features: constant values for features beyond the first two (e.g. probe features), so that
            ``F = 2 + len(extra_features)``; none by default.
        ncols: maximum number of panels per row.
        title: optional figure title.

    Returns:
        ``path`` as a string.

    Example::

        shift = torch.tensor([-0.5, 0.0, 0.5])

        def predict(x, c):
            return torch.sigmoid(4 * (x[:, 0] - (0.0 if c is None else shift[c])))

        plot_decision_boundaries(predict, [-1, 0, 1, 2], "out/boundaries.png")
    """
    if len(clusters) == 0:
        raise ValueError("clusters must name at least one panel.")
    xx, yy = _grid(x_range, x_range if y_range is None else y_range, step)
    features = _grid_features(xx, yy, [] if extra_features is None else extra_features)
    ncols = max(1, min(ncols, len(clusters)))
    nrows = math.ceil(len(clusters) / ncols)
    fig = Figure(figsize=(3.0 * ncols + 1.0, 3.0 * nrows + (0.4 if title else 0.0)), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, cluster in zip(axes, clusters):
        prob = _predict_grid(predict_fn, features, int(cluster), xx.shape)
        name = _panel_title(int(cluster), cluster_names)
        boundary = true_boundary.get(int(cluster)) if isinstance(true_boundary, Mapping) else true_boundary
        filled = _draw_panel(ax, xx, yy, prob, name, points, boundary, int(cluster))
    for ax in axes[len(clusters) :]:
        ax.set_axis_off()
    for ax in axes.reshape(nrows, ncols)[-1]:
        ax.set_xlabel("$x_1$")
    for ax in axes.reshape(nrows, ncols)[:, 0]:
        ax.set_ylabel("$x_2$")
    fig.colorbar(filled, ax=list(axes), label="p(class 1)", shrink=0.9)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def intercept_balance_correlation(intercepts: np.ndarray, class_balance: np.ndarray) -> float:
    """
    Pearson correlation between per-cluster random intercepts and the clusters' fraction of positive labels.

    Args:
        intercepts: ``(C,)`` posterior-mean random intercept of each cluster.
        class_balance: ``(C,)`` fraction of positive labels in each cluster.

    Returns:
        the Pearson ``r``.

    Raises:
        ValueError: when the inputs differ in length, have fewer than 3 clusters, contain non-finite values
            or have zero variance.

    Example::

        intercept_balance_correlation(np.array([-1.0, 0.1, 0.9]), np.array([0.2, 0.5, 0.8]))  # ~0.99
    """
    a = np.asarray(intercepts, dtype=np.float64).ravel()
    b = np.asarray(class_balance, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"intercepts and class_balance differ in length: {a.size} vs {b.size}.")
    if a.size < 3:
        raise ValueError(f"need at least 3 clusters for a correlation, got {a.size}.")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("intercepts and class_balance must be finite (found nan or inf).")
    for name, values in (("intercepts", a), ("class_balance", b)):
        if np.ptp(values) == 0:
            raise ValueError(f"{name} has zero variance; the correlation is undefined.")
    return float(np.corrcoef(a, b)[0, 1])


def plot_intercepts_vs_balance(
    intercepts: np.ndarray,
    class_balance: np.ndarray,
    path: str | os.PathLike,
    cluster_names: Sequence[str] | None = None,
    seen_mask: np.ndarray | None = None,
    xlabel: str = "fraction of positive labels",
    ylabel: str = "random intercept (posterior mean)",
    title: str = "Random intercept vs class balance",
) -> str:
    """
    Scatter per-cluster random intercepts against the clusters' class balance, with a least-squares line.

    The figure title is ``title`` followed by the Pearson ``r`` (see :func:`intercept_balance_correlation`), or
    says that every cluster has the same balance when it does (the correlation is then undefined); each point is
    annotated with its cluster's name. With ``seen_mask``, clusters seen in training are filled markers and
    unseen clusters hollow ones; the line and ``r`` use all clusters.

    Args:
        intercepts: ``(C,)`` posterior-mean random intercept of each cluster.
        class_balance: ``(C,)`` fraction of positive labels in each cluster.
        path: output PNG path; parent directories are created.
        cluster_names: optional ``C`` names; defaults to the cluster indices.
        seen_mask: optional ``(C,)`` booleans, True for clusters seen during training.
        xlabel: label of the class-balance axis (e.g. ``"fraction of AD patients"`` for sites).
        ylabel: label of the intercept axis.
        title: start of the figure title; ``" (r = ...)"`` is appended.

    Returns:
        ``path`` as a string.

    Example::

        plot_intercepts_vs_balance(np.array([-1.0, 0.1, 0.9]), np.array([0.2, 0.5, 0.8]), "out/intercepts.png")
    """
    a = np.asarray(intercepts, dtype=np.float64).ravel()
    b = np.asarray(class_balance, dtype=np.float64).ravel()
    names = _names(cluster_names, a.size, "")
    seen = np.ones(a.size, dtype=bool) if seen_mask is None else np.asarray(seen_mask, dtype=bool).ravel()
    fig = Figure(figsize=(5.5, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.scatter(b[seen], a[seen], color="tab:blue", label="seen clusters" if seen_mask is not None else None)
    if not seen.all():
        ax.scatter(b[~seen], a[~seen], facecolors="none", edgecolors="tab:orange", label="unseen clusters")
    balanced = np.ptp(b) == 0  # e.g. every cluster exactly 50/50: nothing to correlate with
    if not balanced:
        slope, offset = np.polyfit(b, a, 1)
        line_x = np.array([b.min(), b.max()])
        ax.plot(line_x, slope * line_x + offset, "k--", linewidth=1, label="least squares")
    for name, xi, yi in zip(names, b, a):
        ax.annotate(name, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    if balanced:
        ax.set_title(f"{title} (equal balance in every cluster)")
    else:
        r = intercept_balance_correlation(a, b)
        ax.set_title(f"{title} (r = {r:.3f})")
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_feature_importance(
    importance: np.ndarray,
    path: str | os.PathLike,
    feature_names: Sequence[str] | None = None,
    errors: np.ndarray | None = None,
    title: str | None = None,
) -> str:
    """
    Horizontal bar chart of feature importances, largest at the top.

    Args:
        importance: ``(F,)`` importance values, e.g. from :func:`feature_importance`.
        path: output PNG path; parent directories are created.
        feature_names: optional ``F`` names; defaults to ``"feature i"``.
        errors: optional ``(F,)`` error-bar half-widths (e.g. s.d. across runs).
        title: optional axes title.

    Returns:
        ``path`` as a string.

    Example::

        plot_feature_importance(np.array([0.5, 0.02, 0.1]), "out/importance.png", ["x1", "x2", "probe"])
    """
    values = np.asarray(importance, dtype=np.float64).ravel()
    names = np.array(_names(feature_names, values.size, "feature "))
    order = np.argsort(-values, kind="stable")
    err = None if errors is None else np.asarray(errors, dtype=np.float64).ravel()[order]
    fig = Figure(figsize=(6.0, 1.0 + 0.35 * values.size), layout="constrained")
    ax = fig.subplots()
    ax.barh(np.arange(values.size), values[order], xerr=err, color="tab:blue", capsize=3)
    ax.set_yticks(np.arange(values.size), names[order])
    ax.invert_yaxis()
    ax.set_xlabel("importance")
    ax.set_title(title or "Feature importance")
    return save_figure(fig, path)


def plot_random_effect_spread(
    spread: np.ndarray,
    path: str | os.PathLike,
    unit_names: Sequence[str] | None = None,
    title: str | None = None,
    sort: bool = False,
    xlabel: str = "random-effect unit",
    ylabel: str = "s.d. across clusters",
    max_labels: int = 40,
) -> str:
    """
    Bar chart of the across-cluster standard deviation of each random-effect unit.

    Args:
        spread: ``(K,)`` standard deviation across clusters of each random-effect unit.
        path: output PNG path; parent directories are created.
        unit_names: optional ``K`` names; defaults to the unit indices.
        title: optional axes title.
        sort: draw the units from the largest spread to the smallest.
        xlabel: label of the unit axis.
        ylabel: label of the spread axis.
        max_labels: above this many units the bars carry no tick labels (e.g. hundreds of channels).

    Returns:
        ``path`` as a string.

    Example::

        plot_random_effect_spread(np.array([0.3, 0.01, 0.12]), "out/spread.png")
    """
    values = np.asarray(spread, dtype=np.float64).ravel()
    names = np.array(_names(unit_names, values.size, ""))
    if sort:
        order = np.argsort(-values, kind="stable")
        values, names = values[order], names[order]
    width = min(12.0, max(4.0, 1.0 + 0.4 * min(values.size, max_labels)))
    fig = Figure(figsize=(width, 3.5), layout="constrained")
    ax = fig.subplots()
    ax.bar(np.arange(values.size), values, color="tab:green", width=0.8 if values.size <= max_labels else 1.0)
    if values.size <= max_labels:
        crowded = values.size > 8 or sum(len(n) for n in names) > 40
        ax.set_xticks(np.arange(values.size), names, rotation=45 if crowded else 0, ha="right" if crowded else "center")
    else:
        ax.set_xlim(-0.5, values.size - 0.5)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.set_title(title or "Random-effect spread")
    return save_figure(fig, path)


def feature_importance(predict_fn: PredictFn, x_mean: np.ndarray, cluster: int | None = None) -> np.ndarray:
    """
    Absolute gradient of the class-1 probability with respect to each input feature at one point.

    Args:
        predict_fn: ``predict_fn(features, cluster) -> prob`` as in :func:`plot_decision_boundaries`; it is
            called on a ``(1, F)`` tensor and must accept ``cluster=None`` (fixed effects only).
        x_mean: ``(F,)`` point at which the gradient is taken, e.g. the mean input.
        cluster: cluster index, or None (or ``-1``) for the fixed effects.

    Returns:
        ``(F,)`` array ``|d p / d x|``.

    Example::

        imp = feature_importance(lambda x, c: torch.sigmoid(2 * x[:, 0]), np.zeros(2))  # [0.5, 0.0]
    """
    x = torch.as_tensor(np.asarray(x_mean), dtype=torch.float32).reshape(1, -1).clone().requires_grad_(True)
    with torch.enable_grad():
        prob = predict_fn(x, _cluster_tensor(cluster, 1))
        (grad,) = torch.autograd.grad(prob.sum(), x)
    return grad.abs().reshape(-1).detach().cpu().numpy()
