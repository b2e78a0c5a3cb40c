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
from monai_armed.engines.trainer import ARMEDKeys
from monai_armed.metrics import positive_probability
from monai_armed.networks.nets.autoencoder import AECOutput
from monai_armed.utils import atomic_open

if TYPE_CHECKING:
    from ignite.engine import Engine, Events
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = ["AutoencoderOutputWriter", "write_autoencoder_outputs"]

logger = logging.getLogger(__name__)


def _stem(path: str) -> str:
    name = Path(path).name
    for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".nii.gz", ".nii", ".png", ".npy"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


class AutoencoderOutputWriter:
    """Writes, for every image an evaluator runs through an autoencoder-classifier, three float32 TIFFs and a CSV row.

    ``<name>_recon_fe.tif`` is the fixed-effects reconstruction (what the image looks like without the batch),
    ``<name>_recon_me.tif`` the mixed-effects one (with the batch's random effects) and ``<name>_batch_effect.tif``
    their difference, the batch-effect map; networks without random effects write only the first. ``predictions.csv``
    (written when the run completes) holds the image path, ``effects`` (which random effects were used), the phenotype
    probability (mixed effects) and the fixed-effects latent (``latent_fe_0``, ...). Arrays are written in the
    loader's ``(C, W, H)`` order, channel dropped, transposed back to the TIFF's ``(H, W)`` as
    :class:`~monai_armed.data.TiffFileReader` reads it (``reverse_indexing=True``). Every file is written atomically.

    Attach it to an :class:`~monai_armed.engines.ARMEDEvaluator` in ``observed`` mode with an
    :class:`~monai_armed.engines.AutoencoderInferer` and ``decollate=False``: the evaluator resolves each image's
    batch, and one that was never seen in training (``-1``) or has no ``cluster`` gets the evaluator's Z-predictor
    membership when it has one, else fixed effects (``effects`` says ``inferred`` or ``fixed``; a warning counts the
    fallbacks).

    Args:
        output_dir: folder of the TIFFs and of ``predictions.csv``.
        path_key: batch key of the source paths (add it with ``CopyItemsd(keys="image", names="image_path")`` before
            loading).

    Raises:
        KeyError: a batch without ``image`` or ``path_key`` (before anything of that batch is written).
        TypeError: the evaluator's output is not an :class:`~monai_armed.networks.nets.autoencoder.AECOutput`.
        ValueError: a run with no images, or two images with the same file name stem (their outputs would collide).

    Example::

        evaluator = ARMEDEvaluator(device, loader, net, z_predictor=zp, inferer=AutoencoderInferer(), decollate=False)
        AutoencoderOutputWriter("eval/inference").attach(evaluator)
        evaluator.run()
    """

    def __init__(self, output_dir: str | os.PathLike, path_key: str = "image_path") -> None:
        self.output_dir, self.path_key = Path(output_dir), path_key
        self.rows: list[dict[str, Any]] = []
        self._source_of: dict[str, str] = {}  # output stem -> the image it was written for

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_STARTED, self._check_batch)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self._write_csv)

    def _reset(self, engine: Engine) -> None:
        self.rows, self._source_of = [], {}

    def _check_batch(self, engine: Engine) -> None:
        batch = engine.state.batch
        if "image" not in batch or self.path_key not in batch:
            raise KeyError(
                f"AutoencoderOutputWriter needs 'image' and {self.path_key!r} in each batch, got {sorted(batch)}."
            )

    def _fallback(self, engine: Engine) -> str:
        return "inferred" if getattr(engine, "z_predictor", None) is not None else "fixed"

    def __call__(self, engine: Engine) -> None:
        result = engine.state.output[Keys.PRED]
        if not isinstance(result, AECOutput):
            raise TypeError(
                f"AutoencoderOutputWriter needs the evaluator's pred to be an AECOutput, got {type(result).__name__}; "
                "give the evaluator inferer=AutoencoderInferer() and decollate=False."
            )
        paths = [str(p) for p in engine.state.batch[self.path_key]]
        observed = engine.state.output.get(ARMEDKeys.CLUSTER)
        fallback = self._fallback(engine)
        effects = (
            [fallback] * len(paths) if observed is None else ["observed" if int(c) >= 0 else fallback for c in observed]
        )
        prob = positive_probability(result.pred.float()).reshape(-1).cpu().numpy()
        latent = result.latent_fe.float().cpu().numpy()
        for i, path in enumerate(paths):
            stem = _stem(path)
            if stem in self._source_of:  # its maps would silently overwrite the other image's
                raise ValueError(
                    f"AutoencoderOutputWriter: '{path}' and '{self._source_of[stem]}' have the same file name stem "
                    f"{stem!r}, so their outputs in '{self.output_dir}' would overwrite each other; give the images "
                    "unique names."
                )
            self._source_of[stem] = path
            maps = {"recon_fe": result.recon_fe[i]}
            if result.recon_re is not None:
                maps.update(recon_me=result.recon_re[i], batch_effect=result.recon_re[i] - result.recon_fe[i])
            for name, value in maps.items():
                array = value[0].float().cpu().numpy().astype(np.float32)
                save_tiff(
                    self.output_dir / f"{stem}_{name}.tif", array.T if array.ndim == 2 else array.transpose(2, 1, 0)
                )
            row = {"image": path, "effects": effects[i], "probability": float(prob[i])}
            row.update({f"latent_fe_{k}": float(v) for k, v in enumerate(latent[i])})
            self.rows.append(row)

    def _write_csv(self, engine: Engine) -> None:
        if not self.rows:
            raise ValueError("AutoencoderOutputWriter: the evaluator gave no images.")
        fallbacks = sum(r["effects"] != "observed" for r in self.rows)
        if fallbacks:
            logger.warning(
                f"{fallbacks} of {len(self.rows)} images had no seen batch: {self._fallback(engine)} effects were "
                "used for them."
            )
        with atomic_open(self.output_dir / "predictions.csv", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(self.rows[0]))
            writer.writeheader()
            writer.writerows(self.rows)

    @property
    def csv_path(self) -> str:
        """Path of ``predictions.csv``."""
        return str(self.output_dir / "predictions.csv")


def write_autoencoder_outputs(
    network: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    output_dir: str | os.PathLike,
    z_predictor: nn.Module | None = None,
    path_key: str = "image_path",
    device: str | torch.device | None = None,
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

    Returns:
        the path of ``predictions.csv``.

    Raises:
        KeyError, TypeError, ValueError: as :class:`AutoencoderOutputWriter`; ``ValueError`` for an empty loader.

    Example::

        write_autoencoder_outputs(net, DataLoader(dataset, batch_size=8), "eval/inference", z_predictor=zp)
    """
    if isinstance(loader, Sized) and len(loader) == 0:
        raise ValueError("write_autoencoder_outputs: the loader gave no images.")
    writer = AutoencoderOutputWriter(output_dir, path_key=path_key)
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
