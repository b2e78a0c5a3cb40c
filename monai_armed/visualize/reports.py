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

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from monai_armed.metrics import positive_probability
from monai_armed.networks import random_effects_summary
from monai_armed.visualize.figures import (
    feature_importance,
    plot_decision_boundaries,
    plot_feature_importance,
    plot_intercepts_vs_balance,
    plot_random_effect_spread,
)
from monai_armed.visualize.saliency import fe_me_gradcam, save_gradcam_figure
from monai_armed.visualize.sites import (
    cluster_intercepts,
    plot_intercept_vs_patient_fraction,
    plot_random_scale_spread,
    positive_fraction,
)

__all__ = ["write_image_figures", "write_tabular_figures"]


def write_tabular_figures(
    network: nn.Module,
    datalist: Sequence[Mapping],
    output_dir: str | os.PathLike,
    cluster_names: Sequence[str] | None = None,
    features_key: str = "features",
    feature_names: Sequence[str] | None = None,
    true_boundary: np.ndarray | Mapping[int, np.ndarray] | None = None,
    max_panels: int = 10,
) -> dict[str, str]:
    """PNG figures of a trained binary mixed-effects classifier on tabular data (``datalist`` with cluster indices).

    Writes ``decision_boundaries.png`` (per-cluster boundaries in the first two features, fixed effects first, the
    other features held at their mean; with the true boundary when given), ``intercepts_vs_balance.png`` (random
    intercept against each cluster's fraction of positives), ``random_effect_spread.png`` and
    ``feature_importance.png`` (|d p / d x| of the fixed effects at the mean input).

    Returns:
        ``{figure name: path}``.

    Example::

        write_tabular_figures(net, indexed_train_datalist, "eval/figures", cluster_names=vocab.clusters,
                              true_boundary=make_spiral_true_boundary(degrees=360))
    """
    out = Path(output_dir)
    x = np.stack([np.asarray(d[features_key], dtype=np.float32) for d in datalist])
    y = np.asarray([int(d["label"]) for d in datalist])
    cluster = np.asarray([int(d["cluster"]) for d in datalist])
    n_clusters = int(getattr(network, "n_clusters", cluster.max() + 1))
    was_training = network.training
    network.eval()

    def predict(features: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        return positive_probability(network(features, c))

    mean = x.mean(axis=0)
    low, high = x[:, :2].min(axis=0) - 0.2, x[:, :2].max(axis=0) + 0.2
    panels = [-1] + list(range(min(n_clusters, max_panels - 1)))
    paths = {
        "decision_boundaries": plot_decision_boundaries(
            predict,
            panels,
            out / "decision_boundaries.png",
            x_range=(float(low[0]), float(high[0])),
            y_range=(float(low[1]), float(high[1])),
            points=(x[:, :2], y, cluster),
            true_boundary=true_boundary,
            cluster_names=cluster_names,
            extra_features=mean[2:].tolist(),
            title="decision boundary per cluster",
        ),
        "feature_importance": plot_feature_importance(
            feature_importance(predict, mean),
            out / "feature_importance.png",
            feature_names=feature_names,
            title="fixed-effects feature importance |dp/dx| at the mean input",
        ),
    }
    groups = random_effects_summary(network)["groups"]
    seen = np.asarray(cluster) >= 0  # unseen rows (-1) have no intercept; clusters without rows have no balance
    counts = np.bincount(np.asarray(cluster)[seen], minlength=n_clusters)
    present = np.flatnonzero(counts > 0)
    if "intercept" in groups and present.size >= 3:
        balance = np.bincount(np.asarray(cluster)[seen], weights=np.asarray(y)[seen], minlength=n_clusters)[present]
        intercepts = np.asarray(groups["intercept"]["posterior_mean"])[present, 0]
        names = [cluster_names[i] for i in present] if cluster_names is not None else [str(i) for i in present]
        paths["intercepts_vs_balance"] = plot_intercepts_vs_balance(
            intercepts, balance / counts[present], out / "intercepts_vs_balance.png", names
        )
    slopes = {k.removeprefix("slope_"): v["spread"] for k, v in groups.items() if k.startswith("slope")}
    if slopes:
        paths["random_effect_spread"] = plot_random_effect_spread(
            np.concatenate([np.asarray(v) for v in slopes.values()]),
            out / "random_effect_spread.png",
            [f"{k} {i}" for k, v in slopes.items() for i in range(len(v))],
            title="random-slope s.d. across clusters",
        )
    network.train(was_training)
    return paths


def write_image_figures(
    network: nn.Module,
    dataset: Sequence[Mapping],
    output_dir: str | os.PathLike,
    cluster_names: Sequence[str],
    target_layer: str | None = None,
    n_samples: int = 4,
    image_key: str = "image",
) -> dict[str, str]:
    """PNG figures of a trained ARMED image classifier (e.g. the ``ARMED`` wrapper) on a dataset of indexed items.

    Writes ``intercept_vs_patient_fraction.png`` (each site's random intercept against its fraction of positives in
    ``dataset``, with Pearson r), ``random_scale_spread.png`` (across-site s.d. of every random scale: the head's
    feature scales and any ``ClusterScaleBias`` scales) and, with ``target_layer``, ``gradcam.png``: Grad-CAM of the
    fixed-effects path, of the mixed-effects path and their difference for the first ``n_samples`` items of seen
    sites. Figures that the network cannot give (no random intercept, fewer than 3 sites) are skipped.

    Args:
        network: the trained network, ``network(x, cluster=None)`` -> logits ``(B, 1)``.
        dataset: items with ``image_key`` (a ``(C, *spatial)`` tensor), ``label`` and ``cluster`` (index).
        output_dir: folder of the PNGs.
        cluster_names: the vocabulary's cluster names (index order).
        target_layer: module name of the Grad-CAM layer (e.g. ``"network.c5"`` for ``ARMED(ARMEDCNN(...))``).
        n_samples: images in the Grad-CAM figure.
        image_key: key of the image in the items.

    Returns:
        ``{figure name: path}``.

    Example::

        write_image_figures(net, test_dataset, "eval/figures", vocabulary.clusters, target_layer="network.c5")
    """
    out = Path(output_dir)
    label = np.asarray([int(d["label"]) for d in dataset])
    cluster = np.asarray([int(d["cluster"]) for d in dataset])
    summary = random_effects_summary(network, list(cluster_names))
    groups, paths = summary["groups"], {}
    fractions = positive_fraction(label, cluster, cluster_names)
    intercept_group = next((g for g in ("random_intercept", "intercept") if g in groups), None)
    if intercept_group is not None:
        intercepts = {k: v for k, v in cluster_intercepts(summary, intercept_group).items() if k in fractions}
        if len(intercepts) >= 3:
            paths["intercept_vs_patient_fraction"] = plot_intercept_vs_patient_fraction(
                intercepts, fractions, out / "intercept_vs_patient_fraction.png"
            )
    scales = {name: g["spread"] for name, g in groups.items() if name != intercept_group}
    if scales:
        paths["random_scale_spread"] = plot_random_scale_spread(
            np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in scales.values()]),
            out / "random_scale_spread.png",
        )
    seen = [i for i in range(len(dataset)) if cluster[i] >= 0][:n_samples]
    if target_layer is not None and seen:
        device = next(network.parameters()).device
        x = torch.stack([torch.as_tensor(dataset[i][image_key]) for i in seen]).float().to(device)
        c = torch.as_tensor(cluster[seen], dtype=torch.long, device=device)
        maps = fe_me_gradcam(network, x, c, target_layer)
        paths["gradcam"] = save_gradcam_figure(
            x.cpu(),
            maps,
            out / "gradcam.png",
            title=f"Grad-CAM at {target_layer}: fixed effects, mixed effects, difference",
            sample_names=[f"{cluster_names[cluster[i]]} label {label[i]}" for i in seen],
        )
    return paths
