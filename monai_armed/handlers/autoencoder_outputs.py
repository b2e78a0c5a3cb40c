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
"""Inference outputs of an ARMED autoencoder-classifier: reconstructions and batch-effect maps as TIFF, plus a CSV.

The CSV flags images that are out of distribution: their fixed-effects reconstruction error is above a threshold that
:func:`fit_ood_threshold` takes from the training images (a high quantile of their per-image errors) and stores as
JSON beside the checkpoint. An autoencoder reconstructs what it was trained on; an image far from the training cells
(another stain, a saturated or empty field, noise) is reconstructed badly, while its phenotype probability can still
look confident.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
from collections.abc import Iterable, Mapping, Sized
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.utils import CommonKeys as Keys
from monai.utils import IgniteInfo, min_version, optional_import
from torch import nn

from monai_armed.data.tiff import save_tiff
from monai_armed.engines.autoencoder_inferer import AutoencoderInferer
from monai_armed.engines.evaluator import ARMEDEvaluator
from monai_armed.handlers.image_outputs import ImageOutputWriter, _tiff_layout
from monai_armed.metrics import positive_probability, reconstruction_mse
from monai_armed.networks.nets.autoencoder import AECOutput
from monai_armed.utils import write_json

if TYPE_CHECKING:
    from ignite.engine import Engine, Events
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = [
    "DEFAULT_OOD_QUANTILE",
    "AutoencoderOutputWriter",
    "fit_ood_threshold",
    "read_ood_threshold",
    "write_autoencoder_outputs",
]

logger = logging.getLogger(__name__)

DEFAULT_OOD_QUANTILE = 0.99
"""Quantile of the training images' reconstruction errors used as the out-of-distribution threshold."""


def _recon_mse_fe(image: torch.Tensor, result: AECOutput) -> np.ndarray:
    """Per-image MSE ``(B,)`` between the network's input and its fixed-effects reconstruction."""
    return reconstruction_mse(image.detach().float(), result.recon_fe.detach().float(), reduction="none")


@torch.no_grad()
def fit_ood_threshold(
    network: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    output_file: str | os.PathLike | None = None,
    quantile: float = DEFAULT_OOD_QUANTILE,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """The out-of-distribution threshold of an autoencoder-classifier: a quantile of its training reconstruction errors.

    Runs the network (in eval mode; its mode is restored) over ``loader``, computes each image's fixed-effects
    reconstruction MSE (``recon_mse_fe``: the mean over pixels of ``(recon_fe - image)²``; fixed effects, so it needs no
    batch and is defined for images of unseen batches) and takes the ``quantile`` of them (numpy's linear
    interpolation). By construction about ``1 - quantile`` of the training images lie above it; new images of the
    same distribution reconstruct slightly worse than training images, so expect a few more of them to be flagged.
    ``loader`` should give the training images as inference preprocesses them (no augmentation).

    Args:
        network: an autoencoder-classifier with ``forward_autoencoder`` (e.g.
            :class:`~monai_armed.networks.MixedEffectsAutoencoder`).
        loader: dictionary batches with ``image`` ``(B, C, *spatial)``.
        output_file: where to write the result as JSON (atomically), e.g. ``models/ood_threshold.json``; None writes
            nothing.
        quantile: in ``(0, 1]``; 1 takes the largest training error.
        device: device; default the network's.

    Returns:
        ``{"metric": "recon_mse_fe", "quantile", "threshold", "n_images", "mse_median", "mse_max"}``.

    Raises:
        ValueError: ``quantile`` outside ``(0, 1]``, a loader with no images, or non-finite reconstruction errors (a
            diverged model); nothing is written then.
        KeyError: a batch without ``image``.

    Example::

        fit_ood_threshold(net, DataLoader(train_dataset, batch_size=64), "models/ood_threshold.json", quantile=0.99)
        # inference: AutoencoderOutputWriter("eval/inference", ood_threshold="models/ood_threshold.json")
    """
    if isinstance(quantile, bool) or not isinstance(quantile, (int, float)) or not 0.0 < quantile <= 1.0:
        raise ValueError(f"fit_ood_threshold: quantile must be a number in (0, 1], got {quantile!r}.")
    device = torch.device(device) if device is not None else next(network.parameters()).device
    inferer, errors, training = AutoencoderInferer(), [], network.training
    network.eval()
    try:
        for batch in loader:
            if "image" not in batch:
                raise KeyError(f"fit_ood_threshold needs 'image' in each batch, got {sorted(batch)}.")
            x = torch.as_tensor(batch["image"]).to(device, torch.float32)
            errors.append(_recon_mse_fe(x, inferer(x, network)))
    finally:
        network.train(training)
    if not errors:
        raise ValueError("fit_ood_threshold: the loader gave no images.")
    mse = np.concatenate(errors)
    bad = int((~np.isfinite(mse)).sum())
    if bad:
        raise ValueError(
            f"fit_ood_threshold: {bad} of {len(mse)} images have a non-finite reconstruction error; the model has "
            "diverged, so no threshold can be fitted."
        )
    content = {
        "metric": "recon_mse_fe",
        "quantile": float(quantile),
        "threshold": float(np.quantile(mse, quantile)),
        "n_images": int(len(mse)),
        "mse_median": float(np.median(mse)),
        "mse_max": float(mse.max()),
    }
    if output_file is not None:
        write_json(content, output_file)
    return content


def read_ood_threshold(path: str | os.PathLike) -> dict[str, Any] | None:
    """Read a threshold file written by :func:`fit_ood_threshold`; None (with a warning) when it does not exist.

    A missing file is not an error, so models trained before the file existed still run inference, only without the
    out-of-distribution flag.

    Raises:
        ValueError: the file is not JSON, or its ``threshold`` is missing or not a finite number >= 0; the message
            names the file.

    Example::

        read_ood_threshold("models/ood_threshold.json")["threshold"]   # e.g. 0.0042
    """
    path = Path(path)
    if not path.is_file():
        logger.warning(
            f"No out-of-distribution threshold file '{path}' (written at the end of training by fit_ood_threshold): "
            "the 'ood' column of the predictions will be empty."
        )
        return None
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"'{path}' is not a readable out-of-distribution threshold file (invalid JSON: {e}).") from e
    threshold = content.get("threshold") if isinstance(content, dict) else None
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ValueError(f"'{path}': key 'threshold' must be a finite number, got {threshold!r}.")
    if threshold < 0:
        raise ValueError(f"'{path}': key 'threshold' must be >= 0 (a mean squared error), got {threshold!r}.")
    return content


class AutoencoderOutputWriter(ImageOutputWriter):
    """Writes, for every image an evaluator runs through an autoencoder-classifier, three float32 TIFFs and a CSV row.

    ``<name>_recon_fe.tif`` is the fixed-effects reconstruction (what the image looks like without the batch),
    ``<name>_recon_me.tif`` the mixed-effects one (with the batch's random effects) and ``<name>_batch_effect.tif``
    their difference, the batch-effect map; networks without random effects write only the first. ``predictions.csv``
    (written when the run completes) holds the image path, ``effects`` (which random effects were used), the phenotype
    probability (mixed effects), ``recon_mse_fe`` (the fixed-effects reconstruction MSE of the image as the network saw
    it, after preprocessing), ``ood`` (1 when ``recon_mse_fe`` is above the out-of-distribution threshold, else 0;
    empty when there is no threshold) and the fixed-effects latent (``latent_fe_0``, ...). Numbers are written as
    numbers; text cells that a spreadsheet would run as a formula are escaped (:func:`~monai_armed.utils.csv_cell`).
    The number of flagged images is logged (a warning when there are any). Arrays in the loader's ``(C, W, H)`` order
    are transposed back to the TIFF's ``(H, W)`` as :class:`~monai_armed.data.TiffFileReader` reads it
    (``reverse_indexing=True``); one channel is dropped, several are kept as the TIFF's ``C`` axis. Every file is
    written atomically, and none may replace an image that is read (an error before the first file is written when
    the evaluator's dataset lists its images).

    Attach it to an :class:`~monai_armed.engines.ARMEDEvaluator` in ``observed`` mode with an
    :class:`~monai_armed.engines.AutoencoderInferer` and ``decollate=False``: the evaluator resolves each image's
    batch, and one that was never seen in training (``-1``) or has no ``cluster`` gets the evaluator's Z-predictor
    membership when it has one, else fixed effects (``effects`` says ``inferred`` or ``fixed``; a warning counts the
    fallbacks). In another ``cluster_mode`` every image gets that mode's effects, and ``effects`` names it.

    Args:
        output_dir: folder of the TIFFs and of ``predictions.csv``.
        path_key: batch key of the source paths (add it with ``CopyItemsd(keys="image", names="image_path")`` before
            loading).
        ood_threshold: the out-of-distribution threshold on ``recon_mse_fe``: a number, or the JSON file written by
            :func:`fit_ood_threshold` (read when each run starts; a missing file gives a warning and an empty ``ood``
            column); None: no flag.
        gather_processes: under DDP with a sharded loader, one CSV of every process's images (see
            :class:`~monai_armed.handlers.ImageOutputWriter`).

    Raises:
        KeyError: a batch without ``image`` or ``path_key`` (before anything of that batch is written).
        TypeError: the evaluator's output is not an :class:`~monai_armed.networks.nets.autoencoder.AECOutput`.
        ValueError: a run with no images, two images with the same file name stem (their outputs would collide), or an
            invalid ``ood_threshold`` (a negative or non-finite number, a threshold file that cannot be read: raised
            when the run starts).

    Example::

        evaluator = ARMEDEvaluator(device, loader, net, z_predictor=zp, inferer=AutoencoderInferer(), decollate=False)
        AutoencoderOutputWriter("eval/inference", ood_threshold="models/ood_threshold.json").attach(evaluator)
        evaluator.run()
    """

    cluster_word = "batch"
    output_suffixes = ("_recon_fe.tif", "_recon_me.tif", "_batch_effect.tif")

    def __init__(
        self,
        output_dir: str | os.PathLike,
        path_key: str = "image_path",
        ood_threshold: float | str | os.PathLike | None = None,
        gather_processes: bool = False,
    ) -> None:
        super().__init__(output_dir, path_key, "predictions.csv", gather_processes)
        if isinstance(ood_threshold, numbers.Real) and not isinstance(ood_threshold, bool):
            if not math.isfinite(ood_threshold) or ood_threshold < 0:
                raise ValueError(f"AutoencoderOutputWriter: ood_threshold must be a finite number >= 0, got {ood_threshold}.")
        elif ood_threshold is not None and not isinstance(ood_threshold, (str, os.PathLike)):
            raise ValueError(
                "AutoencoderOutputWriter: ood_threshold must be a number, a threshold file path or None, got "
                f"{type(ood_threshold).__name__}."
            )
        self.ood_threshold = ood_threshold
        self.threshold: float | None = None  # the threshold in use for the current run

    def _reset(self, engine: Engine) -> None:
        super()._reset(engine)
        if isinstance(self.ood_threshold, (str, os.PathLike)):  # read at every run: training may rewrite it
            content = read_ood_threshold(self.ood_threshold)
            self.threshold = None if content is None else float(content["threshold"])
        else:
            self.threshold = None if self.ood_threshold is None else float(self.ood_threshold)

    def __call__(self, engine: Engine) -> None:
        result = engine.state.output[Keys.PRED]
        if not isinstance(result, AECOutput):
            raise TypeError(
                f"AutoencoderOutputWriter needs the evaluator's pred to be an AECOutput, got {type(result).__name__}; "
                "give the evaluator inferer=AutoencoderInferer() and decollate=False."
            )
        paths = [str(p) for p in engine.state.batch[self.path_key]]
        effects = self.effects(engine, len(paths))
        prob = positive_probability(result.pred.float()).reshape(-1).cpu().numpy()
        latent = result.latent_fe.float().cpu().numpy()
        mse = _recon_mse_fe(engine.state.output[Keys.IMAGE], result)
        stems = [self.claim_stem(path) for path in paths]  # all of the batch's inputs are known before a write
        for i, (path, stem) in enumerate(zip(paths, stems)):
            maps = {"recon_fe": result.recon_fe[i]}
            if result.recon_re is not None:
                maps.update(recon_me=result.recon_re[i], batch_effect=result.recon_re[i] - result.recon_fe[i])
            for name, value in maps.items():
                save_tiff(self.output_path(stem, f"_{name}.tif"), **_tiff_layout(value.float().cpu().numpy()))
            ood = None if self.threshold is None else int(mse[i] > self.threshold)
            row = {
                "image": path,
                "effects": effects[i],
                "probability": float(prob[i]),
                "recon_mse_fe": float(mse[i]),
                "ood": ood,
            }
            row.update({f"latent_fe_{k}": float(v) for k, v in enumerate(latent[i])})
            self.rows.append(row)

    def _summarize(self, engine: Engine) -> None:
        super()._summarize(engine)
        if self.threshold is not None:
            flagged = sum(r["ood"] for r in self.rows)
            log = logger.warning if flagged else logger.info
            log(
                f"{flagged} of {len(self.rows)} images are out of distribution (ood = 1): their fixed-effects "
                f"reconstruction MSE is above {self.threshold:.6g}; their predictions are unreliable."
            )


def write_autoencoder_outputs(
    network: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    output_dir: str | os.PathLike,
    z_predictor: nn.Module | None = None,
    path_key: str = "image_path",
    device: str | torch.device | None = None,
    ood_threshold: float | str | os.PathLike | None = None,
) -> str:
    """Run an autoencoder-classifier over ``loader`` and write its :class:`AutoencoderOutputWriter` outputs.

    The same as the bundle's ``inference.json``: an :class:`~monai_armed.engines.ARMEDEvaluator` in ``observed`` mode
    with an :class:`~monai_armed.engines.AutoencoderInferer` and the writer attached.

    Args:
        network: e.g. :class:`~monai_armed.networks.MixedEffectsAutoencoder`.
        loader: dictionary batches with ``image`` ``(B, 1, *spatial)``, ``path_key`` (source paths) and optionally
            ``cluster``.
        output_dir: folder of the TIFFs and of ``predictions.csv``.
        z_predictor: optional Z-predictor for unseen or missing batches.
        path_key: key of the source paths.
        device: device; default the network's.
        ood_threshold: as :class:`AutoencoderOutputWriter`: a number or the file of :func:`fit_ood_threshold`.

    Returns:
        the path of ``predictions.csv``.

    Raises:
        KeyError, TypeError, ValueError: as :class:`AutoencoderOutputWriter`; ``ValueError`` for an empty loader.

    Example::

        write_autoencoder_outputs(net, DataLoader(dataset, batch_size=8), "eval/inference", z_predictor=zp,
                                  ood_threshold="models/ood_threshold.json")
    """
    if isinstance(loader, Sized) and len(loader) == 0:
        raise ValueError("write_autoencoder_outputs: the loader gave no images.")
    writer = AutoencoderOutputWriter(output_dir, path_key=path_key, ood_threshold=ood_threshold)
    evaluator = ARMEDEvaluator(
        device=torch.device(device) if device is not None else next(network.parameters()).device,
        val_data_loader=loader,
        network=network,
        z_predictor=z_predictor,
        inferer=AutoencoderInferer(),
        decollate=False,
        val_handlers=[writer],
    )
    evaluator.run()
    return writer.csv_path
