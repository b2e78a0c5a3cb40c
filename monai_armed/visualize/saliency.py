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
Grad-CAM of the fixed-effects path against the mixed-effects path of a network (reference §5.6).

The fixed-effects map shows what the network looks at for any site (``cluster=None``); the mixed-effects map
what it looks at with the sample's site (``cluster=c``); their difference shows what the random effects add.
Built on :class:`monai.visualize.GradCAM`, which forwards ``cluster=`` to the network.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from matplotlib.figure import Figure
from monai.visualize import GradCAM

from monai_armed.visualize.figures import save_figure

__all__ = ["fe_me_gradcam", "save_gradcam_figure"]

_MAP_KEYS = ("fe", "me", "difference")


def _minmax(cam: torch.Tensor) -> torch.Tensor:
    """Each sample's map scaled to ``[0, 1]``; a constant map (e.g. all zero after the ReLU) becomes zeros."""
    flat = cam.flatten(1)
    low = flat.min(dim=1).values.reshape(-1, *[1] * (cam.ndim - 1))
    span = flat.max(dim=1).values.reshape(-1, *[1] * (cam.ndim - 1)) - low
    return torch.where(span > 0, (cam - low) / span.clamp(min=torch.finfo(cam.dtype).tiny), torch.zeros_like(cam))


class _MaxPooledGradCAM(GradCAM):
    """Grad-CAM whose channel weights are the spatial maximum of the gradient (the reference notebook), not the mean."""

    def compute_map(self, x, class_idx=None, retain_graph=False, layer_idx=-1, **kwargs):  # type: ignore[override]
        _, acti, grad = self.nn_module(x, class_idx=class_idx, retain_graph=retain_graph, **kwargs)
        acti, grad = acti[layer_idx], grad[layer_idx]
        weights = grad.flatten(2).amax(dim=2).reshape(*grad.shape[:2], *[1] * (grad.ndim - 2))
        return F.relu((weights * acti).sum(1, keepdim=True))


def _check_gradcam_inputs(network: nn.Module, x: torch.Tensor, cluster: torch.Tensor, target_layer: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim < 3:
        raise ValueError(f"x must be a (B, C, *spatial) tensor, got {getattr(x, 'shape', type(x))}.")
    if not isinstance(cluster, torch.Tensor) or cluster.ndim not in (1, 2) or cluster.shape[0] != x.shape[0]:
        raise ValueError(
            f"cluster must be a tensor of shape (B,) (indices) or (B, C) (soft membership) with B = {x.shape[0]}, "
            f"got {getattr(cluster, 'shape', type(cluster))}."
        )
    names = [name for name, _ in network.named_modules() if name]
    if target_layer not in names:
        raise ValueError(
            f"target_layer {target_layer!r} is not a submodule of the network; last layers: {names[-20:]}."
        )


def fe_me_gradcam(
    network: nn.Module,
    x: torch.Tensor,
    cluster: torch.Tensor,
    target_layer: str,
    class_idx: int = -1,
    grad_pool: str = "mean",
    atol: float = 1e-6,
) -> dict[str, torch.Tensor]:
    """
    Grad-CAM maps of the fixed-effects prediction, the mixed-effects prediction and their difference.

    The network is called as ``network(x, cluster=None)`` (fixed effects) and ``network(x, cluster=cluster)``
    (mixed effects), in eval mode, through :class:`monai.visualize.GradCAM` on a deep copy of ``network``:
    MONAI's hooks stay on the copy, and neither the network's gradients nor its training mode change. Works under
    :func:`torch.no_grad` or :func:`torch.inference_mode` (e.g. inside an evaluator).

    Args:
        network: ``forward(x, cluster=None) -> logits (B, K)``.
        x: ``(B, C, *spatial)`` images (2-D or 3-D).
        cluster: ``(B,)`` int64 cluster indices (``-1`` = unseen) or ``(B, C)`` soft membership.
        target_layer: qualified name of the layer whose activations are weighted
            (``[n for n, _ in network.named_modules()]`` lists them), typically the last convolutional block.
        class_idx: the logit explained; ``-1`` (the last one) is the positive class of a binary head with one or
            two outputs.
        grad_pool: ``"mean"`` (standard Grad-CAM, MONAI's) or ``"max"`` (the reference notebook) pooling of the
            gradient over space for the channel weights.
        atol: a difference whose largest magnitude is below ``atol`` is returned as exactly zero.

    Returns:
        ``{"fe", "me", "difference"}``, each ``(B, 1, *spatial)`` (upsampled to the image size) and detached.
        ``fe`` and ``me`` are min-max normalised per sample to ``[0, 1]``. ``difference`` is ``me - fe`` divided
        by its largest magnitude per sample, in ``[-1, 1]``: positive where the random effects draw attention,
        negative where they remove it (the reference min-max renormalises the difference instead, which hides
        where it is zero).

    Raises:
        ValueError: for a ``target_layer`` that is not in the network, shapes other than the above, or an
            unknown ``grad_pool``.

    Example::

        maps = fe_me_gradcam(net, images, site_index, target_layer="network.features.denseblock4")
        save_gradcam_figure(images, maps, "eval/gradcam.png")
    """
    if grad_pool not in ("mean", "max"):
        raise ValueError(f"grad_pool must be 'mean' or 'max', got {grad_pool!r}.")
    _check_gradcam_inputs(network, x, cluster, target_layer)
    with torch.inference_mode(False), torch.enable_grad():
        # a copy keeps MONAI's permanent hooks, zero_grad and in-place changes off the caller's network
        net = copy.deepcopy(network)
        for p in net.parameters():
            p.requires_grad_(True)
        images, clusters = x.detach().clone(), cluster.detach().clone()
        cam_type = GradCAM if grad_pool == "mean" else _MaxPooledGradCAM
        cam = cam_type(nn_module=net, target_layers=target_layer, postprocessing=_minmax)
        fe = cam(images, class_idx=class_idx, cluster=None).detach()
        me = cam(images, class_idx=class_idx, cluster=clusters).detach()
    difference = me - fe
    scale = difference.flatten(1).abs().max(dim=1).values.reshape(-1, *[1] * (difference.ndim - 1))
    difference = torch.where(scale > atol, difference / scale.clamp(min=atol), torch.zeros_like(difference))
    return {"fe": fe, "me": me, "difference": difference}


def _as_array(value: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def _plane(volume: np.ndarray, slice_index: int | None) -> np.ndarray:
    """A 2-D image as it is; a 3-D volume's slice along its last axis (the middle one by default)."""
    if volume.ndim == 2:
        return volume
    index = volume.shape[-1] // 2 if slice_index is None else slice_index
    if not -volume.shape[-1] <= index < volume.shape[-1]:
        raise ValueError(f"slice_index {index} is out of range for a volume of depth {volume.shape[-1]}.")
    return volume[..., index]


def save_gradcam_figure(
    image: torch.Tensor | np.ndarray,
    maps: Mapping[str, torch.Tensor | np.ndarray],
    path: str | os.PathLike,
    title: str | None = None,
    max_samples: int = 4,
    sample_names: Sequence[str] | None = None,
    slice_index: int | None = None,
) -> str:
    """
    PNG with one row per sample: the image, the fixed-effects and mixed-effects Grad-CAM overlays, and their
    difference (a diverging map: red where the random effects add attention, blue where they remove it).

    Args:
        image: ``(B, C, *spatial)`` images (the first channel is shown), 2-D or 3-D.
        maps: the output of :func:`fe_me_gradcam` (keys ``"fe"``, ``"me"``, ``"difference"``, each
            ``(B, 1, *spatial)``).
        path: output PNG path (written atomically; parent directories are created).
        title: optional figure title.
        max_samples: at most this many samples (the first ones) are drawn.
        sample_names: optional row labels (e.g. subject and site), one per drawn sample or more.
        slice_index: for 3-D images, the slice along the last spatial axis (default: the middle one).

    Returns:
        ``path`` as a string.

    Raises:
        ValueError: when a map is missing or its shape does not match the image's batch and spatial shape, or
            the images are neither 2-D nor 3-D.

    Example::

        save_gradcam_figure(images, fe_me_gradcam(net, images, sites, "network.features.denseblock4"), "eval/gradcam.png",
                            title="AD vs CN: fixed vs mixed effects")
    """
    img = _as_array(image)
    if img.ndim not in (4, 5):
        raise ValueError(f"image must be (B, C, H, W) or (B, C, H, W, D), got shape {img.shape}.")
    missing = [k for k in _MAP_KEYS if k not in maps]
    if missing:
        raise ValueError(f"maps lacks {missing}: expected the keys {list(_MAP_KEYS)} of fe_me_gradcam.")
    arrays = {k: _as_array(maps[k]) for k in _MAP_KEYS}
    expected = (img.shape[0], 1, *img.shape[2:])
    for key, value in arrays.items():
        if value.shape != expected:
            raise ValueError(f"maps[{key!r}] has shape {value.shape}, expected {expected} to match the image.")
    n = max(1, min(max_samples, img.shape[0]))
    fig = Figure(figsize=(9.0, 2.3 * n + 0.9 + (0.4 if title else 0.0)), layout="constrained")
    axes = fig.subplots(n, 4, squeeze=False)
    for i in range(n):
        background = _plane(img[i, 0], slice_index)
        fe, me, diff = (_plane(arrays[k][i, 0], slice_index) for k in _MAP_KEYS)
        for ax in axes[i]:
            ax.imshow(background, cmap="gray")
            ax.set_xticks([])
            ax.set_yticks([])
        cam_image = axes[i, 1].imshow(fe, cmap="jet", vmin=0, vmax=1, alpha=0.5)
        axes[i, 2].imshow(me, cmap="jet", vmin=0, vmax=1, alpha=0.5)
        diff_image = axes[i, 3].imshow(diff, cmap="RdBu_r", vmin=-1, vmax=1, alpha=0.6)
        if sample_names is not None and i < len(sample_names):
            axes[i, 0].set_ylabel(str(sample_names[i]))
    for ax, name in zip(axes[0], ("image", "fixed effects", "mixed effects", "mixed - fixed")):
        ax.set_title(name)
    fig.colorbar(cam_image, ax=list(axes[:, 1:3].ravel()), location="bottom", shrink=0.8, label="Grad-CAM")
    fig.colorbar(diff_image, ax=list(axes[:, 3]), location="bottom", shrink=0.9, label="difference")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)
