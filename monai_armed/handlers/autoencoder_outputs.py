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
"""Inference outputs of an ARMED autoencoder-classifier: reconstructions and batch-effect maps as TIFF, plus a CSV."""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from monai_armed.data.tiff import save_tiff
from monai_armed.engines.evaluator import resolve_cluster
from monai_armed.metrics import positive_probability
from monai_armed.utils import atomic_open

__all__ = ["write_autoencoder_outputs"]

logger = logging.getLogger(__name__)


def _stem(path: str) -> str:
    name = Path(path).name
    for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".nii.gz", ".nii", ".png", ".npy"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _effect_source(cluster: torch.Tensor | None, n: int, fallback: str) -> list[str]:
    return [fallback] * n if cluster is None else ["observed" if int(c) >= 0 else fallback for c in cluster]


@torch.no_grad()
def write_autoencoder_outputs(
    network: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    output_dir: str | os.PathLike,
    z_predictor: nn.Module | None = None,
    path_key: str = "image_path",
    device: str | torch.device | None = None,
) -> str:
    """Run an autoencoder-classifier over ``loader`` and write, for every image, three float32 TIFFs and a CSV row.

    ``<name>_recon_fe.tif`` is the fixed-effects reconstruction (what the image looks like without the batch),
    ``<name>_recon_me.tif`` the mixed-effects one (with the batch's random effects) and ``<name>_batch_effect.tif``
    their difference, the batch-effect map; networks without random effects write only the first. The batch of an
    image is its ``cluster`` index; a batch never seen in training (``-1``) or a missing ``cluster`` falls back to the
    Z-predictor's soft membership when one is given, else to fixed effects (zero random effects), and the CSV's
    ``effects`` column says which was used (a warning counts the fallbacks). ``predictions.csv`` holds the image path,
    ``effects``, the phenotype probability (mixed effects) and the fixed-effects latent (``latent_fe_0``, ...).
    Arrays are written in the loader's ``(C, W, H)`` order, channel dropped, transposed back to the TIFF's
    ``(H, W)`` as :class:`~monai_armed.data.TiffFileReader` reads it (``reverse_indexing=True``).

    Args:
        network: e.g. :class:`~monai_armed.networks.MixedEffectsAutoencoder` (``forward_autoencoder``: everything
            from one pass per batch).
        loader: dictionary batches with ``image`` ``(B, 1, *spatial)``, ``path_key`` (source paths) and optionally
            ``cluster``.
        output_dir: folder of the TIFFs and of ``predictions.csv`` (every file written atomically).
        z_predictor: optional Z-predictor for unseen or missing batches.
        path_key: key of the source path (add it with ``CopyItemsd(keys="image", names="image_path")`` before
            loading).
        device: device; default the network's.

    Returns:
        the path of ``predictions.csv``.

    Raises:
        KeyError: a batch without ``image`` or ``path_key``.
        ValueError: an empty loader, or two images with the same file name stem (their outputs would collide).

    Example::

        write_autoencoder_outputs(net, DataLoader(dataset, batch_size=8), "eval/inference", z_predictor=zp)
    """
    out = Path(output_dir)
    device = torch.device(device) if device is not None else next(network.parameters()).device
    network.eval()
    if z_predictor is not None:
        z_predictor.eval()
    fallback = "inferred" if z_predictor is not None else "fixed"
    rows: list[dict[str, Any]] = []
    source_of: dict[str, str] = {}  # output stem -> the image it was written for
    for batch in loader:
        if "image" not in batch or path_key not in batch:
            raise KeyError(
                f"write_autoencoder_outputs needs 'image' and {path_key!r} in each batch, got {sorted(batch)}."
            )
        x = torch.as_tensor(batch["image"]).to(device, torch.float32)
        observed = torch.as_tensor(batch["cluster"]).reshape(-1).long().to(device) if "cluster" in batch else None
        cluster = resolve_cluster("observed", x, observed, network.n_clusters, z_predictor)
        result = network.forward_autoencoder(x, cluster)
        prob = positive_probability(result.pred).reshape(-1).cpu().numpy()
        latent = result.latent_fe.cpu().numpy()
        effects = _effect_source(observed, x.shape[0], fallback)
        for i, path in enumerate(batch[path_key]):
            stem = _stem(str(path))
            if stem in source_of:  # its maps would silently overwrite the other image's
                raise ValueError(
                    f"write_autoencoder_outputs: '{path}' and '{source_of[stem]}' have the same file name stem "
                    f"{stem!r}, so their outputs in '{out}' would overwrite each other; give the images unique "
                    "names."
                )
            source_of[stem] = str(path)
            maps = {"recon_fe": result.recon_fe[i]}
            if result.recon_re is not None:
                maps.update(recon_me=result.recon_re[i], batch_effect=result.recon_re[i] - result.recon_fe[i])
            for name, value in maps.items():
                array = value[0].cpu().numpy().astype(np.float32)
                save_tiff(out / f"{stem}_{name}.tif", array.T if array.ndim == 2 else array.transpose(2, 1, 0))
            row = {"image": str(path), "effects": effects[i], "probability": float(prob[i])}
            row.update({f"latent_fe_{k}": float(v) for k, v in enumerate(latent[i])})
            rows.append(row)
    if not rows:
        raise ValueError("write_autoencoder_outputs: the loader gave no images.")
    fallbacks = sum(r["effects"] != "observed" for r in rows)
    if fallbacks:
        logger.warning(f"{fallbacks} of {len(rows)} images had no seen batch: {fallback} effects were used for them.")
    csv_path = out / "predictions.csv"
    with atomic_open(csv_path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(csv_path)
