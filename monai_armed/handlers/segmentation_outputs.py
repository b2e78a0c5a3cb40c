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
from typing import TYPE_CHECKING

import numpy as np
import torch
from monai.utils import CommonKeys as Keys
from monai.utils import IgniteInfo, min_version, optional_import
from scipy import ndimage

from monai_armed.data.tiff import save_tiff
from monai_armed.handlers.image_outputs import ImageOutputWriter, _tiff_layout
from monai_armed.metrics.segmentation import label_map

if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["SegmentationWriter"]


class SegmentationWriter(ImageOutputWriter):
    """Writes, for every image an evaluator segments, its class map as a uint8 TIFF and a row of statistics.

    ``<name>_seg.tif`` holds the argmax class of every pixel (0 = background), the size and orientation of the input
    TIFF (the loader's ``(C, W, H)`` map is transposed back to ``(H, W)`` as
    :class:`~monai_armed.data.TiffFileReader` reads it); give the evaluator a sliding-window inferer so that any
    input size works. ``segmentation.csv`` (written when the run completes) holds per image: the source path,
    ``effects`` (``observed`` with the image's seen cluster, else ``inferred`` with a Z-predictor or ``fixed``),
    ``height`` and ``width`` (``depth`` first for a volume), and per foreground class ``c``: ``fraction_c`` (of the
    pixels), ``objects_c`` (connected components, 8-connected in 2-D) and ``mean_area_c`` (pixels per object, empty
    without objects). A one-channel prediction is taken as a class map already (rounded).
    Every file is written atomically; two images with the same file name stem are an error before their files
    collide.

    Args:
        output_dir: folder of the TIFFs and of ``segmentation.csv``.
        path_key: batch key of the source paths (``CopyItemsd(keys="image", names="image_path")`` before loading).
        suffix: appended to each image's stem.
        gather_processes: under DDP with a sharded loader, one CSV of every process's images (see
            :class:`~monai_armed.handlers.ImageOutputWriter`).

    Example::

        evaluator = ARMEDEvaluator(device, loader, net, z_predictor=zp, inferer=SlidingWindowInferer((96, 96)),
                                   task="segmentation", decollate=False)
        SegmentationWriter("eval/inference").attach(evaluator)
        evaluator.run()
    """

    cluster_word = "batch"

    def __init__(
        self,
        output_dir: str | os.PathLike,
        path_key: str = "image_path",
        suffix: str = "_seg",
        gather_processes: bool = False,
    ) -> None:
        super().__init__(output_dir, path_key, "segmentation.csv", gather_processes)
        self.suffix = suffix
        self.output_suffixes = (f"{suffix}.tif",)

    def __call__(self, engine: Engine) -> None:
        pred = engine.state.output[Keys.PRED]
        if not isinstance(pred, torch.Tensor) or pred.dim() < 4:
            raise TypeError(
                f"SegmentationWriter needs logit maps (B, classes, *spatial) as the evaluator's pred, got "
                f"{type(pred).__name__} {tuple(getattr(pred, 'shape', ()))}; give the evaluator decollate=False."
            )
        paths = [str(p) for p in engine.state.batch[self.path_key]]
        effects = self.effects(engine, len(paths))
        classes = label_map(pred)[:, 0].cpu().numpy()
        n_classes = max(int(pred.shape[1]), int(classes.max(initial=0)) + 1, 2)
        stems = [self.claim_stem(path) for path in paths]  # all of the batch's inputs are known before a write
        for i, (path, stem) in enumerate(zip(paths, stems)):
            image_classes = classes[i]
            layout = _tiff_layout(image_classes[None])
            save_tiff(self.output_path(stem, f"{self.suffix}.tif"), **layout)
            stored = layout["array"]
            row = {"image": path, "effects": effects[i]}
            row.update(zip(("depth", "height", "width")[-stored.ndim :], stored.shape))
            for c in range(1, n_classes):
                objects, count = ndimage.label(image_classes == c, structure=np.ones((3,) * image_classes.ndim))
                area = float((objects > 0).sum())
                row[f"fraction_{c}"] = area / image_classes.size
                row[f"objects_{c}"] = int(count)
                row[f"mean_area_{c}"] = area / count if count else None
            self.rows.append(row)
