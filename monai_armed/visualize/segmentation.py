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
"""Figures of a segmentation network across clusters: overlays per batch, fixed vs mixed effects, Dice per batch."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from monai_armed.inferers import cluster_inference
from monai_armed.visualize.figures import save_figure

__all__ = ["plot_dice_per_cluster", "write_segmentation_figures"]


def _first_per_cluster(loader: Any, max_clusters: int) -> list[dict[str, Any]]:
    """One sample (image, label, cluster) of each cluster of a loader, in the order they come. Samples of unseen
    clusters (index -1) are told apart by the prefix of their ``field`` id (``"b06_v003"`` -> ``"b06"``, as the
    generated data name them) when the batch has one, else each is its own group."""
    found: dict[Any, dict[str, Any]] = {}
    for batch in loader:
        clusters = torch.as_tensor(batch.get("cluster", torch.full((batch["image"].shape[0],), -1))).tolist()
        fields = batch.get("field")
        for i, c in enumerate(clusters):
            group = fields[i].rsplit("_", 1)[0] if fields is not None and c < 0 else None
            key = int(c) if c >= 0 else (group if group is not None else -1 - len(found))
            if key not in found:
                found[key] = {k: torch.as_tensor(batch[k][i : i + 1]) for k in ("image", "label", "cluster") if k in batch}
                found[key]["group"] = group
        if len(found) >= max_clusters:
            break
    return list(found.values())[:max_clusters]


def _predict(network: Any, image: torch.Tensor, cluster: torch.Tensor | None, inferer: Any) -> np.ndarray:
    device = next(network.parameters()).device
    with torch.no_grad():
        out = cluster_inference(inferer, image.to(device), network, None if cluster is None else cluster.to(device))
        pred = network.prediction(out) if callable(getattr(network, "prediction", None)) else out
    return pred.argmax(1)[0].cpu().numpy()


def _show(ax: Axes, image: np.ndarray, title: str, masks: Sequence[tuple[np.ndarray, str]] = ()) -> None:
    """An image (in MONAI's (x, y) order, shown as stored) with mask outlines."""
    ax.imshow(image.T, cmap="gray")
    for mask, colour in masks:
        if mask.any():
            ax.contour(mask.T.astype(float), levels=[0.5], colors=colour, linewidths=1.2)
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def _cluster_name(sample: dict[str, Any], names: Sequence[str]) -> str:
    cluster = sample.get("cluster")
    index = -1 if cluster is None else int(cluster.reshape(-1)[0])
    if 0 <= index < len(names):
        return names[index]
    return f"unseen {sample['group']}" if sample.get("group") else "unseen"


def plot_dice_per_cluster(metrics: Mapping[str, Any], path: str | os.PathLike) -> str:
    """Bars of the mean Dice per cluster for every ``dataset/mode`` of a segmentation ``ClusterModeReport``.

    Example::

        plot_dice_per_cluster(json.load(open("eval/metrics.json")), "eval/figures/dice_per_batch.png")
    """
    columns = [(d, m) for d, modes in metrics.items() for m in modes if "per_cluster" in modes[m]]
    fig = Figure(figsize=(max(6.0, 2.5 * len(columns)), 3.5))
    axes = np.atleast_1d(fig.subplots(1, max(len(columns), 1), sharey=True))
    for ax, (dataset, mode) in zip(axes, columns):
        table = metrics[dataset][mode]["per_cluster"]
        names = list(table)
        values = [table[n]["dice"] if table[n]["dice"] is not None else np.nan for n in names]
        ax.bar(range(len(names)), values, color="tab:blue" if dataset == "seen" else "tab:orange")
        ax.set_xticks(range(len(names)), names, rotation=60, fontsize=7)
        overall = metrics[dataset][mode]["dice"]
        ax.set_title(f"{dataset} / {mode}: {overall:.3f}" if overall is not None else f"{dataset} / {mode}", fontsize=9)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("mean Dice per image")
    fig.tight_layout()
    return save_figure(fig, path)


def write_segmentation_figures(
    network: Any,
    loaders: Mapping[str, Any],
    out_dir: str | os.PathLike,
    cluster_names: Sequence[str],
    inferer: Any = None,
    metrics_file: str | os.PathLike | None = None,
    max_clusters: int = 8,
) -> list[str]:
    """The segmentation bundle's figures in ``out_dir``:

    - ``overlays_<dataset>.png``: one image of each cluster (imaging batch) with the true mask (green) and the
      prediction (magenta): mixed effects with the image's own cluster, fixed effects for unseen clusters;
    - ``fixed_vs_mixed.png``: per seen cluster, the fixed-effects and the mixed-effects prediction and where they
      differ;
    - ``dice_per_batch.png``: from ``metrics_file`` (a segmentation ``ClusterModeReport``), the mean Dice per
      cluster in every dataset and mode.

    Args:
        network: the trained network, called as ``network(x, cluster=...)`` (``ARMED``).
        loaders: ``{dataset: loader}`` of dictionary batches with ``image``, ``label`` and ``cluster``.
        out_dir: output folder (created).
        cluster_names: names of the seen clusters.
        inferer: MONAI inferer of the predictions (a sliding window for images larger than the training patches).
        metrics_file: the report's ``metrics.json``; without it there is no Dice figure.
        max_clusters: at most this many clusters per figure.

    Returns:
        the paths written.

    Example::

        write_segmentation_figures(net.eval(), {"seen": test_loader, "unseen": unseen_loader}, "eval/figures",
                                   vocabulary.clusters, inferer=SlidingWindowInferer((96, 96)))
    """
    out = Path(out_dir)
    training = network.training
    network.eval()
    try:
        return _write_figures(network, loaders, out, cluster_names, inferer, metrics_file, max_clusters)
    finally:
        network.train(training)


def _write_figures(
    network: Any,
    loaders: Mapping[str, Any],
    out: Path,
    cluster_names: Sequence[str],
    inferer: Any,
    metrics_file: str | os.PathLike | None,
    max_clusters: int,
) -> list[str]:
    written = []
    seen_samples: list[dict[str, torch.Tensor]] = []
    for dataset, loader in loaders.items():
        samples = _first_per_cluster(loader, max_clusters)
        if dataset == "seen":
            seen_samples = samples
        if not samples:
            continue
        fig = Figure(figsize=(3.0 * len(samples), 3.3))
        axes = np.atleast_1d(fig.subplots(1, len(samples)))
        for ax, sample in zip(axes, samples):
            cluster = sample.get("cluster")
            observed = cluster if cluster is not None and int(cluster.reshape(-1)[0]) >= 0 else None
            pred = _predict(network, sample["image"], observed, inferer)
            truth = sample["label"][0, 0].numpy() > 0 if "label" in sample else np.zeros_like(pred, dtype=bool)
            effects = "mixed" if observed is not None else "fixed"
            _show(ax, sample["image"][0, 0].numpy(), f"{_cluster_name(sample, cluster_names)} ({effects})",
                  [(truth, "lime"), (pred > 0, "magenta")])  # fmt: skip
        fig.tight_layout()
        written.append(save_figure(fig, out / f"overlays_{dataset}.png"))
    seen_samples = [s for s in seen_samples if "cluster" in s and int(s["cluster"].reshape(-1)[0]) >= 0]
    if seen_samples:
        fig = Figure(figsize=(3.0 * len(seen_samples), 9.0))
        axes = fig.subplots(3, len(seen_samples), squeeze=False)
        for column, sample in enumerate(seen_samples):
            fixed = _predict(network, sample["image"], None, inferer)
            mixed = _predict(network, sample["image"], sample["cluster"], inferer)
            image, name = sample["image"][0, 0].numpy(), _cluster_name(sample, cluster_names)
            _show(axes[0, column], image, f"{name}: fixed", [(fixed > 0, "cyan")])
            _show(axes[1, column], image, "mixed", [(mixed > 0, "magenta")])
            _show(axes[2, column], (fixed != mixed).astype(float), f"differ: {int((fixed != mixed).sum())} px")
        fig.tight_layout()
        written.append(save_figure(fig, out / "fixed_vs_mixed.png"))
    if metrics_file is not None and os.path.exists(metrics_file):
        with open(metrics_file) as f:
            written.append(plot_dice_per_cluster(json.load(f), out / "dice_per_batch.png"))
    return written
