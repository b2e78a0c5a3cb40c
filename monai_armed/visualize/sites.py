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
Site-level interpretability figures (reference §5.1-5.2) keyed by site name, for multi-site imaging studies:
each site's random intercept against its fraction of patients, and the spread of the random scales across sites.

The drawing is done by :func:`~monai_armed.visualize.figures.plot_intercepts_vs_balance` and
:func:`~monai_armed.visualize.figures.plot_random_effect_spread`; this module aligns the per-site values and
labels the axes for sites.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from monai_armed.visualize.figures import plot_intercepts_vs_balance, plot_random_effect_spread

__all__ = [
    "cluster_intercepts",
    "positive_fraction",
    "plot_intercept_vs_patient_fraction",
    "plot_random_scale_spread",
]


def cluster_intercepts(
    summary: Mapping, group: str = "intercept", unit: int = 0, factor: str | None = None
) -> dict[str, float]:
    """
    Posterior-mean random intercept of each cluster from a :func:`monai_armed.networks.random_effects_summary`.

    Args:
        summary: the summary dict (``{"clusters": names, "groups": {group: {"posterior_mean": C x K, ...}}}``).
        group: the random-intercept group (a ``re_groups`` name or the qualified name of a ``RandomEffects`` module).
        unit: which column of the group (the output unit for a multi-output intercept).
        factor: with several grouping factors (``"clusters"`` a mapping ``factor -> names``), the factor whose levels
            the group's rows are; default the only one.

    Returns:
        ``{cluster name: intercept}`` in vocabulary order.

    Raises:
        KeyError: when ``summary`` lacks ``group`` (the message lists the groups present) or ``factor``.
        ValueError: when ``unit`` is out of range, the factor is ambiguous, or the names and rows differ in number.

    Example::

        intercepts = cluster_intercepts(random_effects_summary(net, vocabulary.clusters), "random_intercept")  # ARMED
    """
    groups = summary["groups"]
    if group not in groups:
        raise KeyError(f"random-effects summary has no group {group!r}; groups present: {sorted(groups)}.")
    means = np.asarray(groups[group]["posterior_mean"], dtype=np.float64)
    if means.ndim != 2 or not 0 <= unit < means.shape[1]:
        raise ValueError(f"group {group!r} has posterior means of shape {means.shape}; unit {unit} is out of range.")
    names = summary["clusters"]
    if isinstance(names, Mapping):  # several grouping factors
        if factor is None and len(names) != 1:
            raise ValueError(f"the summary has the grouping factors {list(names)}: pass factor= to pick one.")
        key = factor if factor is not None else next(iter(names))
        if key not in names:
            raise KeyError(f"grouping factor {key!r} is not in the summary: {list(names)}.")
        names = names[key]
    if len(names) != means.shape[0]:
        raise ValueError(f"group {group!r} has {means.shape[0]} rows but the summary names {len(names)} clusters.")
    return {str(name): float(v) for name, v in zip(names, means[:, unit])}


def positive_fraction(
    labels: np.ndarray | torch.Tensor | Sequence[int],
    clusters: np.ndarray | torch.Tensor | Sequence,
    cluster_names: Sequence[str] | None = None,
) -> dict[str, float]:
    """
    Fraction of positive labels (e.g. patients) in each cluster.

    Args:
        labels: ``(N,)`` labels in ``{0, 1}``.
        clusters: ``(N,)`` raw cluster ids (site names) or indices; ``-1`` indices (unseen) are left out.
        cluster_names: names of integer indices, as in a cluster vocabulary; default ``str(cluster)``.

    Returns:
        ``{cluster name: fraction}`` for every cluster present, in sorted cluster order.

    Raises:
        ValueError: when the lengths differ, a label is not 0 or 1, or an index has no name.

    Example::

        positive_fraction([1, 0, 1, 1], ["siteA", "siteA", "siteB", "siteB"])   # {"siteA": 0.5, "siteB": 1.0}
    """
    y = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.float64).ravel()
    c = np.asarray(clusters.detach().cpu() if isinstance(clusters, torch.Tensor) else clusters).ravel()
    if y.shape != c.shape:
        raise ValueError(f"labels and clusters differ in length: {y.size} vs {c.size}.")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError(f"labels must be 0 or 1, found {np.unique(y[~np.isin(y, (0.0, 1.0))])[:5].tolist()}.")
    if np.issubdtype(c.dtype, np.floating) and c.size and (c == np.round(c)).all():
        c = c.astype(np.int64)  # indices stored as floats (a float tensor): the same as integer indices
    integer = np.issubdtype(c.dtype, np.integer)
    if integer:
        keep = c >= 0
        y, c = y[keep], c[keep]
        if cluster_names is not None and c.size and c.max() >= len(cluster_names):
            raise ValueError(f"cluster index {int(c.max())} has no name: cluster_names holds {len(cluster_names)}.")
    values, inverse = np.unique(c, return_inverse=True)
    fraction = np.bincount(inverse, weights=y, minlength=values.size) / np.bincount(inverse, minlength=values.size)
    names = [str(cluster_names[v]) if integer and cluster_names is not None else str(v) for v in values.tolist()]
    return dict(zip(names, fraction.tolist()))


def plot_intercept_vs_patient_fraction(
    intercepts: Mapping[str, float],
    patient_fraction: Mapping[str, float],
    path: str | os.PathLike,
    xlabel: str = "fraction of patients at the site",
    title: str = "Site random intercept vs patient fraction",
) -> str:
    """
    Scatter each site's random intercept against its fraction of patients, with the Pearson ``r`` in the title.

    Under site confounding (sites that recruit more patients) the intercepts absorb the site's prior and
    correlate with its patient fraction (reference §5.2).

    Args:
        intercepts: ``{site: posterior-mean random intercept}``, e.g. from :func:`cluster_intercepts`.
        patient_fraction: ``{site: fraction of positive labels}``, e.g. from :func:`positive_fraction` on the
            training data; sites without an intercept (unseen in training) are ignored.
        path: output PNG path (written atomically; parent directories are created).
        xlabel: label of the fraction axis.
        title: start of the title; ``" (r = ...)"`` is appended.

    Returns:
        ``path`` as a string.

    Raises:
        ValueError: when a site of ``intercepts`` has no patient fraction, when fewer than 3 sites are given, or
            when values are not finite (see :func:`~monai_armed.visualize.figures.intercept_balance_correlation`).

    Example::

        plot_intercept_vs_patient_fraction({"A": -0.4, "B": 0.1, "C": 0.5}, {"A": 0.2, "B": 0.5, "C": 0.7},
                                           "eval/intercept_vs_patient_fraction.png")
    """
    sites = [str(s) for s in intercepts]
    fractions = {str(k): v for k, v in patient_fraction.items()}
    missing = [s for s in sites if s not in fractions]
    if missing:
        raise ValueError(f"sites without a patient fraction: {missing[:10]}; patient_fraction has {sorted(fractions)}.")
    if len(sites) < 3:
        raise ValueError(f"need at least 3 sites for the intercept figure, got {len(sites)}.")
    return plot_intercepts_vs_balance(
        np.array([float(v) for v in intercepts.values()]),
        np.array([float(fractions[s]) for s in sites]),
        path,
        cluster_names=sites,
        xlabel=xlabel,
        ylabel="site random intercept (posterior mean)",
        title=title,
    )


def plot_random_scale_spread(
    spread: np.ndarray | torch.Tensor | Sequence[float],
    path: str | os.PathLike,
    feature_names: Sequence[str] | None = None,
    title: str = "Spread of the random scales across sites",
) -> str:
    """
    Sorted bar chart of the across-site standard deviation of each random scale (one per feature or channel).

    Large bars mark the features whose scaling differs most between sites (the site effects the network absorbed
    in its random effects); the bars carry names only when there are few of them.

    Args:
        spread: ``(K,)`` s.d. across sites, e.g. ``random_effects_summary(net)["groups"][name]["spread"]``.
        path: output PNG path (written atomically; parent directories are created).
        feature_names: optional ``K`` names; defaults to the feature indices.
        title: axes title.

    Returns:
        ``path`` as a string.

    Raises:
        ValueError: when ``spread`` is empty or not finite, or ``feature_names`` has another length.

    Example::

        plot_random_scale_spread(summary["groups"]["random_slope"]["spread"], "eval/random_scale_spread.png")
    """
    values = np.asarray(spread.detach().cpu() if isinstance(spread, torch.Tensor) else spread, dtype=np.float64)
    values = values.ravel()
    if values.size == 0 or not np.all(np.isfinite(values)):
        raise ValueError(f"spread must be a non-empty array of finite values, got {values.size} values.")
    return plot_random_effect_spread(
        values,
        path,
        unit_names=feature_names,
        title=title,
        sort=True,
        xlabel="feature (sorted by spread)",
        ylabel="s.d. of random scale across sites",
    )
