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
"""Evaluation report of an ARMED autoencoder-classifier: classification, reconstruction and batch-effect metrics."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.utils import IgniteInfo, min_version, optional_import
from torch import nn

from monai_armed.engines.evaluator import resolve_cluster
from monai_armed.handlers.cluster_mode_report import dataset_modes
from monai_armed.metrics.binary import _shared_threshold
from monai_armed.metrics import (
    anova_f_by_cluster,
    binary_metrics,
    image_quality_metrics,
    latent_cluster_scores,
    positive_probability,
    reconstruction_mse,
)
from monai_armed.utils import nan_to_none, write_json
from monai_armed.visualize import save_latent_embedding, save_reconstruction_grid

if TYPE_CHECKING:
    from ignite.engine import Engine, Events
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
idist, _ = optional_import("ignite.distributed", IgniteInfo.OPT_IMPORT_VERSION, min_version)

__all__ = ["AutoencoderReport"]

logger = logging.getLogger(__name__)


class AutoencoderReport:
    """Metrics of a trained (mixed-effects) autoencoder-classifier on several datasets and cluster modes.

    For every dataset and mode (``observed`` / ``fixed`` / ``randomized`` / ``inferred``, as for
    :class:`~monai_armed.engines.ARMEDEvaluator`; ``observed`` falls back to the Z-predictor or to fixed effects for
    unseen clusters) it stores the phenotype AUROC, the balanced accuracy, sensitivity and specificity at the Youden
    threshold fitted on ``threshold_dataset`` in the same mode, and the reconstruction MSE: ``mse`` of the model's own
    reconstruction in that mode (the random-effects decoder's when the network has one, else the fixed-effects
    decoder's) and ``mse_fe`` of the fixed-effects reconstruction. Then, against the batch (cluster) label:

    - ``latent``: Davies-Bouldin and Calinski-Harabasz scores of the z-scored fixed-effects (and random-effects)
      latents of ``latent_dataset``'s seen clusters; for a fixed-effects latent higher DB / lower CH means less batch
      clustering;
    - ``anova_f``: one-way ANOVA F across the seen batches of the brightness, contrast, sharpness and SNR of the
      originals and of the fixed- and mixed-effects reconstructions of ``anova_dataset`` (lower F: less batch
      effect; the channels of a multi-channel image are averaged first).

    Each is null (with a warning naming its dataset) when that dataset has fewer than two seen batches to compare.

    ``save_figures`` writes the reconstruction grid (original / fixed / mixed / difference per batch) and the 2-D
    embedding of the latents coloured by batch and by label. Batches hold ``image``, ``label`` and ``cluster`` (index,
    ``-1`` for unseen). The report is written as strict JSON (NaN as ``null``; by rank 0 under ``torch.distributed``).
    It evaluates the loaders it is given in its own process: under DDP, give it whole (unsharded) loaders.

    Args:
        network: an autoencoder-classifier with ``encode(x, cluster)`` and ``forward_autoencoder(x, cluster)`` (one
            pass per mode for logits and reconstructions; e.g. :class:`~monai_armed.networks.MixedEffectsAutoencoder`).
        datasets: name -> iterable of dictionary batches (e.g. ``{"train": ..., "seen": ..., "unseen": ...}``).
        modes: name -> cluster modes; default ``observed, fixed, randomized`` (+ ``inferred`` with a Z-predictor). An
            entry that names no dataset is ignored with a warning.
        n_clusters: number of seen clusters (for ``randomized``); default ``network.n_clusters``.
        z_predictor: optional Z-predictor giving soft memberships for ``inferred`` (and unseen rows of ``observed``).
        threshold_dataset: dataset whose predictions fix each mode's decision threshold.
        latent_dataset: dataset of the latent scores.
        anova_dataset: dataset of the ANOVA of reconstruction image metrics (its ``observed`` mode), or ``None`` (no
            ANOVA); ``"auto"`` (default): ``"seen"`` when there is such a dataset, else none.
        output_file: JSON report path, or ``None``.
        cluster_names: vocabulary names of the cluster indices (figures).
        label_names: names of the labels (figures).
        device: device to evaluate on; default the network's.
        seed: seed of the ``randomized`` mode.

    Example::

        report = AutoencoderReport(net, {"train": train_loader, "seen": test_loader, "unseen": unseen_loader},
                                   modes={"seen": ["observed", "fixed", "randomized"], "unseen": ["fixed"]},
                                   output_file="eval/metrics.json")
        metrics = report.run()
        metrics["seen"]["observed"]["auroc"], metrics["latent"]["fe"]["davies_bouldin"]
        report.save_figures("eval/figures", dataset="seen")
    """

    def __init__(
        self,
        network: nn.Module,
        datasets: Mapping[str, Iterable[Mapping[str, Any]]],
        modes: Mapping[str, Sequence[str]] | None = None,
        n_clusters: int | None = None,
        z_predictor: nn.Module | None = None,
        threshold_dataset: str | None = "train",
        latent_dataset: str = "train",
        anova_dataset: str | None = "auto",
        output_file: str | os.PathLike | None = None,
        cluster_names: Sequence[str] | None = None,
        label_names: Sequence[str] | None = None,
        device: str | torch.device | None = None,
        seed: int = 0,
    ) -> None:
        if anova_dataset == "auto":
            anova_dataset = "seen" if "seen" in datasets else None
        roles = (("threshold_dataset", threshold_dataset), ("latent_dataset", latent_dataset), ("anova_dataset", anova_dataset))
        for role, name in roles:
            if name is not None and name not in datasets:
                raise ValueError(f"{role} {name!r} is not one of the datasets {sorted(datasets)}.")
        self.network, self.z_predictor, self.datasets = network, z_predictor, dict(datasets)
        self.n_clusters = int(n_clusters if n_clusters is not None else network.n_clusters)
        default = ["observed", "fixed", "randomized"] + (["inferred"] if z_predictor is not None else [])
        self.modes = dataset_modes(modes, list(datasets), default, type(self).__name__)
        if threshold_dataset is not None:  # evaluated in every mode that another dataset needs its threshold for
            needed = [m for name in datasets for m in self.modes[name]]
            self.modes[threshold_dataset] = list(dict.fromkeys([*self.modes[threshold_dataset], *needed]))
        if "observed" not in self.modes[latent_dataset]:
            self.modes[latent_dataset].insert(0, "observed")
        self.threshold_dataset, self.latent_dataset, self.anova_dataset = (
            threshold_dataset,
            latent_dataset,
            anova_dataset,
        )
        self.output_file, self.cluster_names, self.label_names, self.seed = (
            output_file,
            cluster_names,
            label_names,
            seed,
        )
        self.device = torch.device(device) if device is not None else next(network.parameters()).device
        self.collected: dict[str, dict[str, np.ndarray]] = {}

    def attach(self, engine: Engine) -> None:
        if not engine.has_event_handler(self, Events.COMPLETED):
            engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine | None = None) -> dict:
        return self.run()

    def run(self) -> dict:
        """Evaluate every dataset in its modes, write and return the report.

        Raises:
            KeyError: a batch without ``image``, ``label`` or ``cluster``.
            ValueError: a dataset without batches, or a single-class ``threshold_dataset`` (no threshold to fit).
        """
        self.collected = {name: self._collect(name, loader) for name, loader in self.datasets.items()}
        order = [self.threshold_dataset] if self.threshold_dataset is not None else []
        order += [name for name in self.datasets if name not in order]
        results: dict[str, Any] = {}
        for name in order:
            data, results[name] = self.collected[name], {}
            for mode in self.modes[name]:
                threshold = None
                if self.threshold_dataset is not None and name != self.threshold_dataset:
                    fitted = results[self.threshold_dataset][mode]["threshold"]
                    threshold = _shared_threshold(fitted, self.threshold_dataset, name, "AutoencoderReport")
                results[name][mode] = self._mode_summary(data, mode, threshold)
        results["latent"] = self._latent_scores(self.collected[self.latent_dataset])
        if self.anova_dataset in self.collected:
            results["anova_f"] = self._anova(self.collected[self.anova_dataset])
        results = nan_to_none(results)
        if self.output_file is not None and idist.get_rank() == 0:
            write_json(results, self.output_file)
        return results

    def save_figures(
        self, output_dir: str | os.PathLike, dataset: str = "seen", per_cluster: int = 1
    ) -> dict[str, str]:
        """Reconstruction grid of ``dataset`` (observed clusters) and latent embedding of the latent dataset.

        Example::

            report.run()
            report.save_figures("eval/figures")      # {"reconstructions": ..., "latent_embedding": ...}
        """
        if not self.collected:
            raise RuntimeError("AutoencoderReport.save_figures needs the collected outputs: call run() first.")
        out, data = Path(output_dir), self.collected[dataset]
        paths = {
            "reconstructions": str(
                save_reconstruction_grid(
                    data["image"], data["recon_fe"], data.get("recon_me_observed"), data["cluster"],
                    out / "reconstructions.png", cluster_names=self.cluster_names, per_cluster=per_cluster,
                )
            )
        }  # fmt: skip
        latent = self.collected[self.latent_dataset]
        latents = {"fixed effects": latent["latent_fe"]}
        if "latent_re" in latent:
            latents["random effects"] = latent["latent_re"]
        paths["latent_embedding"] = str(
            save_latent_embedding(
                latents, latent["cluster"], latent["label"], out / "latent_embedding.png",
                cluster_names=self.cluster_names, label_names=self.label_names,
            )
        )  # fmt: skip
        return paths

    @torch.no_grad()
    def _collect(self, name: str, loader: Iterable[Mapping[str, Any]]) -> dict[str, np.ndarray]:
        network, z_predictor, modes = self.network, self.z_predictor, self.modes[name]
        network_training = network.training
        z_predictor_training = z_predictor is not None and z_predictor.training
        network.eval()
        if z_predictor is not None:
            z_predictor.eval()
        generator = torch.Generator().manual_seed(self.seed)
        parts: dict[str, list[torch.Tensor]] = {}
        try:
            for batch in loader:
                if any(key not in batch for key in ("image", "label", "cluster")):
                    raise KeyError(
                        f"AutoencoderReport needs 'image', 'label' and 'cluster' batches, got {sorted(batch)} in "
                        f"dataset {name!r}."
                    )
                x = torch.as_tensor(batch["image"]).to(self.device, torch.float32)
                cluster = torch.as_tensor(batch["cluster"]).reshape(-1).long().to(self.device)
                row = {"image": x, "label": torch.as_tensor(batch["label"]).reshape(-1), "cluster": cluster}
                latents = network.encode(x, cluster)
                row["latent_fe"] = latents.fe
                if latents.re is not None:
                    row["latent_re"] = latents.re
                for mode in modes:
                    mode_cluster = resolve_cluster(mode, x, cluster, self.n_clusters, z_predictor, generator)
                    out = network.forward_autoencoder(x, mode_cluster)
                    row["recon_fe"] = out.recon_fe
                    if out.recon_re is not None:
                        row[f"recon_me_{mode}"] = out.recon_re
                    row[f"logits_{mode}"] = out.pred
                for key, value in row.items():
                    parts.setdefault(key, []).append(value.detach().float().cpu())
        finally:
            network.train(network_training)
            if z_predictor is not None:
                z_predictor.train(z_predictor_training)
        if not parts:
            raise ValueError(f"AutoencoderReport: dataset {name!r} gave no batches.")
        return {key: torch.cat(values).numpy() for key, values in parts.items()}

    def _mode_summary(self, data: Mapping[str, np.ndarray], mode: str, threshold: float | None) -> dict[str, Any]:
        prob = positive_probability(torch.from_numpy(data[f"logits_{mode}"])).numpy()
        summary: dict[str, Any] = dict(binary_metrics(data["label"].astype(np.int64), prob, threshold=threshold))
        recon = data.get(f"recon_me_{mode}", data["recon_fe"])
        summary["mse"] = reconstruction_mse(data["image"], recon, reduction="mean")
        summary["mse_fe"] = reconstruction_mse(data["image"], data["recon_fe"], reduction="mean")
        return summary

    def _latent_scores(self, data: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
        seen = data["cluster"] >= 0
        clusters = data["cluster"][seen]
        latents = {"fe": data["latent_fe"]} | ({"re": data["latent_re"]} if "latent_re" in data else {})
        n_seen = np.unique(clusters).size
        if not 2 <= n_seen < clusters.size:  # the scores compare batches, each with more than one image
            logger.warning(
                f"AutoencoderReport: dataset {self.latent_dataset!r} has {n_seen} seen batch(es) in {clusters.size} "
                "images; the latent batch scores need at least 2 batches and more images than batches: null."
            )
            return {name: {"davies_bouldin": math.nan, "calinski_harabasz": math.nan} for name in latents}
        return {name: latent_cluster_scores(latent[seen], clusters) for name, latent in latents.items()}

    def _anova(self, data: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
        images = {"original": data["image"], "fe": data["recon_fe"]}
        if "recon_me_observed" in data:
            images["me"] = data["recon_me_observed"]
        seen = data["cluster"] >= 0
        n_seen = np.unique(data["cluster"][seen]).size
        if n_seen < 2:
            logger.warning(
                f"AutoencoderReport: dataset {self.anova_dataset!r} has {n_seen} seen batch(es); the ANOVA across "
                "batches needs at least 2: null."
            )
            return {name: dict.fromkeys(("brightness", "contrast", "sharpness", "snr"), math.nan) for name in images}
        # the image metrics are those of one channel: several are averaged first (a grey-level version)
        return {
            name: anova_f_by_cluster(image_quality_metrics(x[seen].mean(axis=1, keepdims=True)), data["cluster"][seen])
            for name, x in images.items()
        }
