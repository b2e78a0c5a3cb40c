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
"""The ARMED autoencoder-classifier family (ARMED-AEC): conventional, domain-adversarial and mixed-effects AECs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn as nn
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Pool

from monai_armed.networks.blocks.cluster_norm import cluster_context
from monai_armed.networks.utils import total_kl_divergence
from monai_armed.utils import shape_str

__all__ = [
    "AECOutput",
    "AECLatents",
    "AECReconstruction",
    "AECEncoder",
    "AECDecoder",
    "AutoencoderClassifier",
    "RandomEffectsAutoencoder",
    "LatentClassifier",
    "ImageClusterClassifier",
    "MixedEffectsAutoencoder",
    "AEC_VARIANTS",
    "AEC_LOSS_WEIGHTS",
    "PAPER_AEC_CONFIG",
    "PAPER_IMAGE_CLASSIFIER_CONFIG",
    "aec_loss_weights",
]

#: The paper's AEC models (armed_method.md sections 2.3, 9.1 Table V): whether the network has the random-effects
#: autoencoder and mixing classifier, and whether the trainer uses the cluster adversary (``adv`` switch).
AEC_VARIANTS: dict[str, dict] = {
    "conventional": {"random_effects": False, "adv": 0},
    "domain_adversarial": {"random_effects": False, "adv": 1},
    "armed": {"random_effects": True, "adv": 1},
    "armed_no_adversary": {"random_effects": True, "adv": 0},
}

#: Default ``ARMEDAutoencoderTrainer`` loss weights. From armed_method.md section 3.3 (recon 1, gen 0.1, CSB KL
#: 1e-5; the RE-AEC's target head 0.01 and its two domain-enhancing cluster terms 0.001), except: the fixed-effects
#: classifier weight is 0.1 (the conventional AEC's; the DA-AEC's 0.01 barely trains the classifier in a few epochs
#: on small data) and the mixer's is 1 (it only trains the mixing head when its inputs are detached). The small
#: random-effects head weights matter: with 0.1 / 0.01 / 0.01 the random-effects reconstruction error on the
#: microscopy data was 1.2x the conventional AEC's, with the paper's 0.01 / 0.001 / 0.001 it is 0.8x. The KL weight
#: multiplies ``KL / n_train`` (the trainer divides by the training images), so 1e-5 on the KL summed over the
#: random-effects layers is ``1e-5 * n_train`` here: the default 0.005 is that at about 500 images (the microscopy
#: bundle's 0.00536 at 536). The reference weights the *mean* of its encoder's and of its decoder's layer terms by
#: 1e-5 (1e-7 in its RE-AEC script), so this shrinks the random effects more (about 3.5x with 7 layers). It is not 1
#: (the ELBO) because the reconstruction loss is a per-pixel mean, not an image's log-likelihood.
AEC_LOSS_WEIGHTS: dict[str, float] = {
    "recon_weight": 1.0,
    "cls_weight": 0.1,
    "adv_weight": 0.1,
    "recon_re_weight": 1.0,
    "re_cls_weight": 0.01,
    "mix_weight": 1.0,
    "latent_cluster_weight": 0.001,
    "image_cluster_weight": 0.001,
    "kl_weight": 0.005,
}

_RE_WEIGHTS = (
    "recon_re_weight",
    "re_cls_weight",
    "mix_weight",
    "latent_cluster_weight",
    "image_cluster_weight",
    "kl_weight",
)

#: The melanoma setting of the paper (256 x 256 grayscale; armed_method.md section 2.3) as
#: ``MixedEffectsAutoencoder`` / ``AutoencoderClassifier`` arguments. Kernels are 3 instead of the paper's 4: MONAI's
#: 'same' padding needs an odd kernel.
PAPER_AEC_CONFIG: dict = {
    "spatial_dims": 2,
    "in_shape": (1, 256, 256),
    "channels": (64, 64, 64, 128, 256, 512),
    "strides": (1, 1, 1, 2, 2, 2),
    "kernel_size": 3,
    "latent_size": 56,
    "tie_weights": True,
}

#: The paper's reconstruction cluster classifier (seven stride-2 blocks) as ``ImageClusterClassifier`` arguments.
PAPER_IMAGE_CLASSIFIER_CONFIG: dict = {"channels": (16, 32, 32, 64, 64, 128, 256), "strides": 2, "kernel_size": 3}

_KERAS_BATCH_NORM = ("batch", {"eps": 1e-3, "momentum": 0.01})


def aec_loss_weights(variant: str, gen_weight: float | None = None, **overrides: float) -> dict[str, float]:
    """``ARMEDAutoencoderTrainer`` loss weights of one of the paper's AEC models (``AEC_VARIANTS``).

    Starts from :data:`AEC_LOSS_WEIGHTS`; ``adv_weight`` is ``gen_weight`` (default the table's) for variants with an
    adversary and 0 otherwise; the random-effects weights are 0 for the fixed-effects-only variants.

    Args:
        variant: a key of :data:`AEC_VARIANTS`.
        gen_weight: weight of the adversarial term for variants with an adversary.
        overrides: any other weight of :data:`AEC_LOSS_WEIGHTS`.

    Raises:
        ValueError: unknown variant or weight name.

    Example::

        aec_loss_weights("domain_adversarial", gen_weight=0.05)["adv_weight"]   # 0.05
        aec_loss_weights("conventional")["mix_weight"]                           # 0.0
    """
    spec = _variant(variant)
    unknown = sorted(set(overrides) - set(AEC_LOSS_WEIGHTS))
    if unknown:
        raise ValueError(f"unknown AEC loss weight(s) {unknown}; expected some of {sorted(AEC_LOSS_WEIGHTS)}.")
    weights = {**AEC_LOSS_WEIGHTS, **overrides}
    gen = weights["adv_weight"] if gen_weight is None else gen_weight
    weights["adv_weight"] = float(spec["adv"] * gen)
    if not spec["random_effects"]:
        weights.update({name: 0.0 for name in _RE_WEIGHTS})
    return weights


def _variant(variant: str) -> dict:
    if variant not in AEC_VARIANTS:
        raise ValueError(f"unknown AEC variant {variant!r}; expected one of {sorted(AEC_VARIANTS)}.")
    return AEC_VARIANTS[variant]


class AECOutput(NamedTuple):
    """Everything one ARMED-AEC training step needs, from a single forward pass.

    Fields that a variant does not have are ``None`` (the random-effects ones for fixed-effects-only variants).

    Attributes:
        pred: mixed-effects logits (mixing classifier); the fixed-effects logits for fixed-effects-only variants, for
            ``cluster=None`` and in the rows of unseen clusters (``-1``).
        pred_fe: fixed-effects logits (auxiliary classifier on the FE latent).
        pred_re: logits of the target head on the random-effects latent.
        recon_fe: fixed-effects reconstruction ``(B, *in_shape)`` in ``[0, 1]``.
        recon_re: random-effects (mixed) reconstruction with the given clusters.
        latent_fe: fixed-effects latent ``(B, latent_size)``.
        latent_re: random-effects latent ``(B, latent_size)``.
        features: the FE encoder's block outputs and its latent, for the cluster adversary.
        latent_cluster_logits: cluster logits of the random-effects latent ``(B, n_clusters)``.
        kl: summed KL divergence of every random-effects layer (0 without random effects).

    Example::

        out = net.forward_autoencoder(x, cluster)
        loss = F.mse_loss(out.recon_fe, x) - 0.1 * F.cross_entropy(adversary(out.features), cluster)
    """

    pred: torch.Tensor
    pred_fe: torch.Tensor
    pred_re: torch.Tensor | None
    recon_fe: torch.Tensor
    recon_re: torch.Tensor | None
    latent_fe: torch.Tensor
    latent_re: torch.Tensor | None
    features: list[torch.Tensor]
    latent_cluster_logits: torch.Tensor | None
    kl: torch.Tensor


class AECLatents(NamedTuple):
    """Latent codes of an ARMED-AEC: ``fe`` (fixed effects) and ``re`` (random effects, ``None`` if absent).

    Example::

        with torch.no_grad():
            latents = net.encode(x, cluster)
        davies_bouldin_score(latents.fe.cpu().numpy(), batch)     # high = little batch clustering in the FE latent
    """

    fe: torch.Tensor
    re: torch.Tensor | None


class AECReconstruction(NamedTuple):
    """Reconstructions of an ARMED-AEC: ``fe`` (fixed effects) and ``me`` (random-effects decoder with the given
    clusters, ``None`` for fixed-effects-only variants).

    Example::

        recon = net.reconstruct(x, cluster)
        batch_signature = recon.me - recon.fe
    """

    fe: torch.Tensor
    me: torch.Tensor | None


def _check_layout(spatial_dims: int, in_shape: Sequence[int], channels: Sequence[int], strides: Sequence[int]) -> None:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
    if len(in_shape) != spatial_dims + 1 or min(in_shape) < 1:
        raise ValueError(
            f"in_shape must be (channels, {', '.join('size' for _ in range(spatial_dims))}) with positive sizes for "
            f"spatial_dims={spatial_dims}, got {tuple(in_shape)}."
        )
    if not channels or min(channels) < 1:
        raise ValueError(f"channels must list at least one positive width, got {tuple(channels)}.")
    if len(strides) != len(channels) or min(strides) < 1:
        raise ValueError(
            f"strides must give one positive stride per entry of channels ({len(channels)}), got {tuple(strides)}."
        )
    factor = math.prod(strides)
    if any(size % factor for size in in_shape[1:]):
        raise ValueError(
            f"the spatial size {tuple(in_shape[1:])} of in_shape must be divisible by the product of the strides "
            f"({factor}), so that the decoder mirrors the encoder exactly."
        )


def _prelu(channels: int) -> tuple:
    # one learnable slope per channel, starting as a ReLU (Keras' PReLU starts at 0)
    return ("prelu", {"num_parameters": channels, "init": 0.0})


def _latent_batch_norm(norm: str | tuple, latent_size: int) -> nn.BatchNorm1d:
    """The latent's ``BatchNorm1d``, with the blocks' batch-norm arguments when they use one (Keras' otherwise)."""
    name, kwargs = (norm, {}) if isinstance(norm, str) else (norm[0], dict(norm[1]) if len(norm) > 1 else {})
    keras = {"eps": 1e-3, "momentum": 0.01}
    return nn.BatchNorm1d(latent_size, **({**keras, **kwargs} if str(name).lower() == "batch" else keras))


class AECEncoder(nn.Module):
    """Convolutional encoder of the AEC family: strided ``Conv -> norm -> PReLU`` blocks, then a dense latent.

    Each block is a MONAI :class:`~monai.networks.blocks.Convolution` ('same' padding, so a stride ``s`` divides the
    size by ``s``); the last map is flattened into ``Linear -> latent`` (plus ``BatchNorm1d`` when ``latent_norm``).

    Args:
        spatial_dims: 2 or 3.
        in_shape: ``(channels, *spatial)`` of the images.
        channels: output channels of the blocks.
        strides: stride of each block.
        kernel_size: odd kernel size.
        latent_size: width of the latent code.
        norm: norm of the blocks, a MONAI name or ``(name, kwargs)`` (``("clusterscalebias", {"n_clusters": C})``
            for the random-effects encoder).
        latent_norm: add ``BatchNorm1d`` after the latent (the fixed-effects encoder of the paper), with the arguments
            of ``norm`` when that is a batch norm.

    Example::

        enc = AECEncoder(2, (1, 32, 32), channels=(8, 16), strides=(2, 2), latent_size=16)
        features, latent = enc(torch.rand(4, 1, 32, 32))      # [(4, 8, 16, 16), (4, 16, 8, 8)], (4, 16)
    """

    def __init__(
        self,
        spatial_dims: int,
        in_shape: Sequence[int],
        channels: Sequence[int],
        strides: Sequence[int],
        kernel_size: int = 3,
        latent_size: int = 32,
        norm: str | tuple = _KERAS_BATCH_NORM,
        latent_norm: bool = True,
    ) -> None:
        super().__init__()
        _check_layout(spatial_dims, in_shape, channels, strides)
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd (MONAI 'same' padding), got {kernel_size}.")
        self.in_shape = tuple(int(s) for s in in_shape)
        factor = math.prod(strides)
        self.out_shape = (int(channels[-1]),) + tuple(s // factor for s in self.in_shape[1:])
        self.blocks = nn.ModuleList()
        width = self.in_shape[0]
        for out, stride in zip(channels, strides):
            self.blocks.append(
                Convolution(
                    spatial_dims, width, out, strides=stride, kernel_size=kernel_size, act=_prelu(out), norm=norm
                )
            )
            width = out
        self.latent = nn.Linear(math.prod(self.out_shape), latent_size)
        self.latent_norm = _latent_batch_norm(norm, latent_size) if latent_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        if tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(
                f"expected images of shape (batch, {', '.join(str(s) for s in self.in_shape)}), got {shape_str(x)}."
            )
        features = []
        for block in self.blocks:
            x = block(x)
            features.append(x)
        return features, self.latent_norm(self.latent(x.flatten(1)))


class AECDecoder(nn.Module):
    """Decoder mirroring an :class:`AECEncoder`: ``Linear -> reshape -> PReLU``, transposed-conv blocks, sigmoid.

    Block ``i`` mirrors encoder block ``n-1-i`` (same stride, channels in reverse); the last one maps back to the
    image channels with no activation before the sigmoid, so reconstructions are in ``[0, 1]``, and with a norm only
    when ``final_norm``. The paper puts one there (a batch norm in the fixed-effects decoder, a one-channel
    ``ClusterScaleBias`` in the random-effects one), but a norm on the single output channel takes away each image's
    own mean and contrast (instance norm) or slows down learning the mean intensity (batch norm): measured on the
    microscopy data, the random-effects reconstruction error was 0.017 with it, worse than a flat image (0.008). A block of stride
    ``s > 1`` upsamples by nearest-neighbour interpolation and then convolves ("resize-convolution"): a transposed
    convolution whose odd kernel does not divide evenly by its stride paints a checkerboard that the last norm
    amplifies into saturated pixels. ``tie_weights`` uses transposed convolutions instead and shares each kernel with
    the mirrored encoder convolution (the paper's ``TiedDecoder``; biases stay separate).

    Args:
        encoder: the encoder to mirror (its layout, and its kernels when tied).
        channels: the encoder's block channels.
        strides: the encoder's block strides.
        kernel_size: odd kernel size.
        latent_size: width of the latent code.
        norm: norm of every block, a MONAI name or ``(name, kwargs)``.
        tie_weights: transposed convolutions sharing their kernels with ``encoder``.
        final_norm: a norm on the last (image-channel) block too.

    Example::

        enc = AECEncoder(2, (1, 32, 32), (8, 16), (2, 2), latent_size=16)
        dec = AECDecoder(enc, (8, 16), (2, 2), latent_size=16)
        recon = dec(enc(x)[1])                  # (B, 1, 32, 32) in [0, 1]
    """

    def __init__(
        self,
        encoder: AECEncoder,
        channels: Sequence[int],
        strides: Sequence[int],
        kernel_size: int = 3,
        latent_size: int = 32,
        norm: str | tuple = _KERAS_BATCH_NORM,
        tie_weights: bool = False,
        final_norm: bool = False,
    ) -> None:
        super().__init__()
        spatial_dims = len(encoder.in_shape) - 1
        self.start_shape = encoder.out_shape
        self.expand = nn.Linear(latent_size, math.prod(self.start_shape))
        self.expand_act = nn.PReLU(self.start_shape[0], init=0.0)
        self.blocks = nn.ModuleList()
        widths = [encoder.in_shape[0]] + [int(c) for c in channels]
        for i in reversed(range(len(channels))):
            last, stride = i == 0, int(strides[i])
            conv = Convolution(
                spatial_dims,
                widths[i + 1],
                widths[i],
                strides=stride if tie_weights else 1,
                kernel_size=kernel_size,
                act=None if last else _prelu(widths[i]),
                norm=None if last and not final_norm else norm,
                is_transposed=tie_weights,
            )
            if tie_weights or stride == 1:
                self.blocks.append(conv)
            else:
                self.blocks.append(nn.Sequential(nn.Upsample(scale_factor=stride, mode="nearest"), conv))
        if tie_weights:
            for block, mirror in zip(self.blocks, reversed(encoder.blocks)):
                block.conv.weight = mirror.conv.weight  # Conv (out, in, k..) and ConvTranspose (in, out, k..) agree
        self.sigmoid = nn.Sigmoid()

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        x = self.expand_act(self.expand(latent).view((-1,) + self.start_shape))
        for block in self.blocks:
            x = block(x)
        return self.sigmoid(x)


def _keras_init(module: nn.Module) -> None:
    """Glorot-uniform kernels and zero biases (the Keras defaults of the reference); tied kernels are set once."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _head(in_features: int, hidden: Sequence[int], out_features: int, act: nn.Module) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_features, width), act]
        in_features = width
    return nn.Sequential(*layers, nn.Linear(in_features, out_features))


class AutoencoderClassifier(nn.Module):
    """Conventional autoencoder-classifier (AEC), the fixed-effects half of ARMED-AEC (armed_method.md section 2.3).

    Encoder ``x -> e`` (conv blocks with BatchNorm and PReLU, ``Linear`` to the latent, ``BatchNorm1d``), decoder
    ``e -> x_hat`` (mirrored upsampling conv blocks, sigmoid) and an auxiliary classifier ``e -> Linear(32) ->
    LeakyReLU(0.3) -> Linear(out_channels)`` giving logits. ``forward(x)`` returns the logits.

    Deviations from the reference: kernels are odd (3 by default; the paper's 4 has no symmetric 'same' padding),
    PReLU has one slope per channel, the decoder upsamples by resize-convolution and is not weight-tied unless
    ``tie_weights=True`` (transposed convolutions sharing the encoder's kernels, as the paper's; :data:`PAPER_AEC_CONFIG`
    ties), and its last convolution has no BatchNorm before the sigmoid (see :class:`AECDecoder`). Kernels are
    Glorot-uniform and BatchNorm uses Keras' eps 1e-3 / momentum 0.99.

    Args:
        spatial_dims: 2 or 3.
        in_shape: ``(channels, *spatial)`` of the images (sizes the dense layers; divisible by the strides' product).
        out_channels: number of logits (1 for a binary task with a sigmoid / BCE loss).
        channels: encoder block channels (paper: ``(64, 64, 64, 128, 256, 512)``).
        strides: encoder block strides (paper: ``(1, 1, 1, 2, 2, 2)``).
        kernel_size: odd kernel size.
        latent_size: latent width (paper: 56).
        latent_norm: ``BatchNorm1d`` after the latent, as in the paper.
        norm: norm of the conv blocks, a MONAI name or ``(name, kwargs)``.
        classifier_channels: hidden width of the auxiliary classifier.
        tie_weights: share the decoder's kernels with the encoder.

    Example::

        aec = AutoencoderClassifier(2, (1, 64, 64), out_channels=1)
        logits = aec(x)                               # (B, 1)
        recon = aec.decode(aec.encode(x))             # (B, 1, 64, 64)
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_shape: Sequence[int] = (1, 64, 64),
        out_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64, 64),
        strides: Sequence[int] = (2, 2, 2, 1),
        kernel_size: int = 3,
        latent_size: int = 32,
        latent_norm: bool = True,
        norm: str | tuple = _KERAS_BATCH_NORM,
        classifier_channels: int = 32,
        tie_weights: bool = False,
    ) -> None:
        super().__init__()
        self.in_shape, self.out_channels, self.latent_size = tuple(in_shape), out_channels, latent_size
        self.encoder = AECEncoder(
            spatial_dims, in_shape, channels, strides, kernel_size, latent_size, norm, latent_norm
        )
        self.decoder = AECDecoder(self.encoder, channels, strides, kernel_size, latent_size, norm, tie_weights)
        self.classifier = _head(latent_size, (classifier_channels,), out_channels, nn.LeakyReLU(0.3))
        self.feature_channels = int(sum(channels)) + latent_size
        _keras_init(self)

    def encode_features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``(block outputs, latent)`` of the encoder."""
        return self.encoder(x)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The latent code ``(B, latent_size)``."""
        return self.encoder(x)[1]

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """The reconstruction ``(B, *in_shape)`` in ``[0, 1]``."""
        return self.decoder(latent)

    def classify(self, latent: torch.Tensor) -> torch.Tensor:
        """The auxiliary classifier's logits ``(B, out_channels)``."""
        return self.classifier(latent)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.encode(x))


class LatentClassifier(nn.Module):
    """The random-effects latent's two heads: target ``Linear(32) -> ReLU -> Linear(out)`` and cluster
    ``Linear(32) -> ReLU -> Linear(16) -> ReLU -> Linear(n_clusters)`` (logits; armed_method.md section 2.3).

    Args:
        latent_size: latent width.
        out_channels: number of target logits.
        n_clusters: number of seen clusters.

    Example::

        heads = LatentClassifier(32, out_channels=1, n_clusters=4)
        target_logits, cluster_logits = heads(latent)      # (B, 1), (B, 4)
    """

    def __init__(self, latent_size: int, out_channels: int, n_clusters: int) -> None:
        super().__init__()
        self.target = _head(latent_size, (32,), out_channels, nn.ReLU())
        self.cluster = _head(latent_size, (32, 16), n_clusters, nn.ReLU())

    def forward(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.target(latent), self.cluster(latent)


class RandomEffectsAutoencoder(nn.Module):
    """The random-effects ("domain-enhancing") autoencoder of ARMED-AEC (armed_method.md sections 1.2, 2.3).

    The structure of :class:`AutoencoderClassifier`, but every norm is a
    :class:`~monai_armed.networks.blocks.ClusterScaleBias` (instance norm, then ``(1 + g(z)) x + b(z)`` with
    per-cluster random scales and biases), and the latent has no BatchNorm. The output layer has no norm (the
    paper's one-channel ``ClusterScaleBias`` before the sigmoid took away each image's own brightness). A
    :class:`LatentClassifier` reads the latent. Trained so that its latent and reconstruction *keep* the batch
    information. The cluster (index ``(B,)`` with ``-1`` = unseen, soft ``(B, n_clusters)``, or ``None``: zero
    random effects) is an argument of :meth:`encode`, :meth:`decode` and ``forward``.

    Args:
        spatial_dims: 2 or 3.
        in_shape: ``(channels, *spatial)`` of the images.
        out_channels: number of target logits.
        n_clusters: number of seen clusters.
        channels: encoder block channels.
        strides: encoder block strides.
        kernel_size: odd kernel size.
        latent_size: latent width.
        tie_weights: share the decoder's kernels with the encoder.
        norm_kwargs: further :class:`ClusterScaleBias` arguments (default: posterior means start with s.d. 0.1, prior
            s.d. 0.25, as the reference AEC).

    Example::

        re_aec = RandomEffectsAutoencoder(2, (1, 32, 32), 1, n_clusters=4, channels=(8, 16), strides=(2, 2))
        recon = re_aec(x, cluster)                    # (B, 1, 32, 32), with each cluster's batch signature
        target_logits, cluster_logits = re_aec.latent_classifier(re_aec.encode(x, cluster))
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_shape: Sequence[int] = (1, 64, 64),
        out_channels: int = 1,
        n_clusters: int = 2,
        channels: Sequence[int] = (16, 32, 64, 64),
        strides: Sequence[int] = (2, 2, 2, 1),
        kernel_size: int = 3,
        latent_size: int = 32,
        tie_weights: bool = False,
        norm_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        self.n_clusters = int(n_clusters)
        norm = ("clusterscalebias", {"n_clusters": self.n_clusters, **(norm_kwargs or {})})
        self.encoder = AECEncoder(spatial_dims, in_shape, channels, strides, kernel_size, latent_size, norm, False)
        self.decoder = AECDecoder(self.encoder, channels, strides, kernel_size, latent_size, norm, tie_weights)
        self.latent_classifier = LatentClassifier(latent_size, out_channels, self.n_clusters)
        _keras_init(self)

    def encode(self, x: torch.Tensor, cluster: torch.Tensor | None = None) -> torch.Tensor:
        """The random-effects latent ``(B, latent_size)``."""
        with cluster_context(self.encoder, cluster):
            return self.encoder(x)[1]

    def decode(self, latent: torch.Tensor, cluster: torch.Tensor | None = None) -> torch.Tensor:
        """The reconstruction with the clusters' random effects ``(B, *in_shape)``."""
        with cluster_context(self.decoder, cluster):
            return self.decoder(latent)

    def forward(self, x: torch.Tensor, cluster: torch.Tensor | None = None) -> torch.Tensor:
        with cluster_context(self, cluster):
            return self.decoder(self.encoder(x)[1])


class ImageClusterClassifier(nn.Module):
    """Predicts the cluster (batch) of an image: strided ``Conv -> BatchNorm -> PReLU`` blocks, global average
    pooling, ``Linear(n_clusters)`` logits.

    ARMED-AEC trains it on real images and then uses it, frozen, to judge the random-effects reconstructions, which
    must keep the batch signature (armed_method.md section 3.3). The paper's version has seven stride-2 blocks
    (:data:`PAPER_IMAGE_CLASSIFIER_CONFIG`) and a final 2 x 2 'valid' conv instead of the pooling.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        n_clusters: number of seen clusters.
        channels: block channels.
        strides: one stride for all blocks or one per block.
        kernel_size: odd kernel size.
        norm: norm of the blocks; keep one that does not remove per-image intensity (not instance norm), since
            intensity is a typical batch signature. The default is the paper's Keras BatchNorm (momentum 0.01 in
            torch's convention), whose running statistics lag a training of a few hundred steps, so that evaluation
            sees out-of-date statistics; the microscopy bundle passes ``("batch", {"eps": 1e-3, "momentum": 0.1})``.

    Example::

        judge = ImageClusterClassifier(2, in_channels=1, n_clusters=4)
        logits = judge(images)                        # (B, 4)
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        n_clusters: int = 2,
        channels: Sequence[int] = (16, 32, 64, 64),
        strides: int | Sequence[int] = 2,
        kernel_size: int = 3,
        norm: str | tuple = _KERAS_BATCH_NORM,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if n_clusters < 2:
            raise ValueError(f"an image cluster classifier needs at least 2 clusters, got n_clusters={n_clusters}.")
        strides = [int(strides)] * len(channels) if isinstance(strides, int) else [int(s) for s in strides]
        if not channels or len(strides) != len(channels):
            raise ValueError(f"give at least one block and one stride per block, got {channels} and {strides}.")
        self.spatial_dims, self.in_channels, self.n_clusters = spatial_dims, in_channels, n_clusters
        blocks, width = [], in_channels
        for out, stride in zip(channels, strides):
            blocks.append(
                Convolution(
                    spatial_dims, width, out, strides=stride, kernel_size=kernel_size, act=_prelu(out), norm=norm
                )
            )
            width = out
        self.blocks = nn.Sequential(*blocks)
        self.pool = Pool[Pool.ADAPTIVEAVG, spatial_dims](1)
        self.out = nn.Linear(width, n_clusters)
        _keras_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"ImageClusterClassifier expected images (batch, {self.in_channels}, <{self.spatial_dims} spatial "
                f"dims>), got {shape_str(x)}."
            )
        return self.out(self.pool(self.blocks(x)).flatten(1))


class MixedEffectsAutoencoder(nn.Module):
    """ARMED-AEC, the mixed-effects autoencoder-classifier of the paper, with its baselines as ``variant``.

    - fixed-effects part (all variants): an :class:`AutoencoderClassifier` (``fixed_effects``); its encoder's block
      outputs and latent (``features``) feed the cluster adversary of the domain-adversarial variants, which the
      trainer holds;
    - random-effects part (``"armed"``, ``"armed_no_adversary"``): a :class:`RandomEffectsAutoencoder`
      (``random_effects``) and the mixing classifier ``concat(e_F, e_R) -> Linear(32) -> LeakyReLU(0.3) ->
      Linear(out_channels)`` (``mixer``) that gives the mixed-effects prediction.

    ``detach_mixer_inputs=True`` (default) feeds the mixer detached latents, so the FE and RE autoencoders get no
    gradient from each other or from the mixer: training everything jointly is then the same as the paper's
    separately trained DA-AEC (or conventional AEC) + RE-AEC + mixer. This is what Table V implies (ARMED-AEC has
    the DA-AEC's latent scores exactly). ``False`` lets the mixer's loss shape both encoders.

    ``forward(x, cluster=None)`` returns plain logits (what inference, export and evaluators see): the mixer's when a
    cluster is given and the variant has random effects, else the fixed-effects logits. Rows with cluster ``-1``
    (unseen) get the fixed-effects logits as well, as ``cluster=None`` and every other network of the package (the
    paper's ``z = 0`` would feed the mixer a random-effects latent it never saw in training; their reconstruction,
    :meth:`reconstruct`, is the one with zero random effects). :meth:`forward_autoencoder` returns an
    :class:`AECOutput` with everything training needs from one pass (``forward_armed`` is the same pass, the name
    ``ARMEDTrainer``'s DDP adapter calls).

    Differences from the released reference code, on purpose (armed_method.md section 10): its ``MixedEffectsAEC``
    shares the FE encoder, has no mixing subnetwork and adds the adversarial term; here, as in the paper, the RE
    autoencoder has its own random-effects encoder, a mixer combines the two latents and the trainer subtracts the
    adversarial term. The reference's AEC adversary is a conv network; :class:`ClusterAdversary` pools each block
    output and concatenates the latent. See :class:`AutoencoderClassifier` for the block-level deviations.

    Args:
        spatial_dims: 2 or 3.
        in_shape: ``(channels, *spatial)`` of the images.
        out_channels: number of logits.
        n_clusters: number of seen clusters.
        variant: a key of :data:`AEC_VARIANTS`.
        channels: encoder block channels (both autoencoders).
        strides: encoder block strides.
        kernel_size: odd kernel size.
        latent_size: latent width of each autoencoder.
        classifier_channels: hidden width of the FE auxiliary classifier and of the mixer.
        tie_weights: tie each decoder's kernels to its encoder's.
        detach_mixer_inputs: see above.
        latent_norm: ``BatchNorm1d`` after the FE latent.
        norm: norm of the FE conv blocks.
        norm_kwargs: further :class:`ClusterScaleBias` arguments of the RE autoencoder.
        adversary_inputs: what ``AECOutput.features`` gives the cluster adversary: ``"all"`` (the paper's multi-level
            adversary: every FE encoder block output and the latent) or ``"latent"`` (the FE latent only, the code
            whose batch invariance is asked for; the early blocks cannot drop image intensity, which carries the
            batch, without failing to reconstruct).

    Example::

        net = MixedEffectsAutoencoder(2, (1, 64, 64), out_channels=1, n_clusters=6, variant="armed")
        adversary = ClusterAdversary(net.feature_channels, n_clusters=6, hidden_channels=(64, 32))
        logits = net(x, cluster)                   # mixed effects; net(x): fixed effects
        out = net.forward_autoencoder(x, cluster)  # AECOutput for ARMEDAutoencoderTrainer
        paper = MixedEffectsAutoencoder(**PAPER_AEC_CONFIG, out_channels=1, n_clusters=6)
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_shape: Sequence[int] = (1, 64, 64),
        out_channels: int = 1,
        n_clusters: int = 2,
        variant: str = "armed",
        channels: Sequence[int] = (16, 32, 64, 64),
        strides: Sequence[int] = (2, 2, 2, 1),
        kernel_size: int = 3,
        latent_size: int = 32,
        classifier_channels: int = 32,
        tie_weights: bool = False,
        detach_mixer_inputs: bool = True,
        latent_norm: bool = True,
        norm: str | tuple = _KERAS_BATCH_NORM,
        norm_kwargs: dict | None = None,
        adversary_inputs: str = "all",
    ) -> None:
        super().__init__()
        if n_clusters < 1:
            raise ValueError(f"n_clusters must be >= 1, got {n_clusters}.")
        if adversary_inputs not in ("all", "latent"):
            raise ValueError(f"adversary_inputs must be 'all' or 'latent', got {adversary_inputs!r}.")
        self.adversary_inputs = adversary_inputs
        spec = _variant(variant)
        self.variant, self.n_clusters, self.out_channels = variant, int(n_clusters), out_channels
        self.in_shape, self.latent_size = tuple(int(s) for s in in_shape), latent_size
        self.detach_mixer_inputs = detach_mixer_inputs
        layout = dict(
            spatial_dims=spatial_dims,
            in_shape=in_shape,
            out_channels=out_channels,
            channels=channels,
            strides=strides,
            kernel_size=kernel_size,
            latent_size=latent_size,
            tie_weights=tie_weights,
        )
        self.fixed_effects = AutoencoderClassifier(
            **layout, latent_norm=latent_norm, norm=norm, classifier_channels=classifier_channels
        )
        self.random_effects: RandomEffectsAutoencoder | None = None
        self.mixer: nn.Module | None = None
        if spec["random_effects"]:
            self.random_effects = RandomEffectsAutoencoder(**layout, n_clusters=n_clusters, norm_kwargs=norm_kwargs)
            self.mixer = _head(2 * latent_size, (classifier_channels,), out_channels, nn.LeakyReLU(0.3))
            _keras_init(self.mixer)

    @classmethod
    def from_variant(cls, variant: str, **kwargs) -> MixedEffectsAutoencoder:
        """Build one of the paper's AEC models by name; ``kwargs`` give everything else (sizes, clusters).

        Example::

            nets = {v: MixedEffectsAutoencoder.from_variant(v, n_clusters=6) for v in AEC_VARIANTS}
        """
        return cls(**{**kwargs, "variant": variant})

    @property
    def has_random_effects(self) -> bool:
        return self.random_effects is not None

    @property
    def feature_channels(self) -> int:
        """Width of the pooled adversary inputs: ``ClusterAdversary(net.feature_channels, n_clusters)``."""
        return self.latent_size if self.adversary_inputs == "latent" else self.fixed_effects.feature_channels

    def kl_divergence(self) -> torch.Tensor:
        """Summed KL divergence of every random-effects layer (0 for fixed-effects-only variants)."""
        return total_kl_divergence(self)

    def encode(self, x: torch.Tensor, cluster: torch.Tensor | None = None) -> AECLatents:
        """Latent codes: ``fe``, and ``re`` (with the clusters' random effects) when the variant has it."""
        latent_fe = self.fixed_effects.encode(x)
        latent_re = self.random_effects.encode(x, cluster) if self.random_effects is not None else None
        return AECLatents(latent_fe, latent_re)

    def reconstruct(self, x: torch.Tensor, cluster: torch.Tensor | None = None) -> AECReconstruction:
        """Reconstructions: ``fe``, and ``me`` from the RE autoencoder (``None`` / ``-1``: zero random effects)."""
        recon_fe = self.fixed_effects.decode(self.fixed_effects.encode(x))
        recon_me = self.random_effects(x, cluster) if self.random_effects is not None else None
        return AECReconstruction(recon_fe, recon_me)

    def _mix(self, latent_fe: torch.Tensor, latent_re: torch.Tensor) -> torch.Tensor:
        if self.detach_mixer_inputs:
            latent_fe, latent_re = latent_fe.detach(), latent_re.detach()
        return self.mixer(torch.cat([latent_fe, latent_re], dim=1))

    @staticmethod
    def _unseen_rows_fixed(cluster: torch.Tensor, pred_fe: torch.Tensor, pred_me: torch.Tensor) -> torch.Tensor:
        """The mixed-effects logits, with the fixed-effects ones in the rows of unseen clusters (index ``-1``)."""
        if cluster.is_floating_point():  # soft membership: every row has its mixture of seen clusters
            return pred_me
        return torch.where((cluster < 0).reshape(-1, 1), pred_fe, pred_me)

    def forward(self, x: torch.Tensor, cluster: torch.Tensor | None = None) -> torch.Tensor:
        latent_fe = self.fixed_effects.encode(x)
        pred_fe = self.fixed_effects.classify(latent_fe)
        if cluster is None or self.random_effects is None:
            return pred_fe
        return self._unseen_rows_fixed(cluster, pred_fe, self._mix(latent_fe, self.random_effects.encode(x, cluster)))

    def forward_autoencoder(self, x: torch.Tensor, cluster: torch.Tensor | None = None) -> AECOutput:
        """Predictions, reconstructions, latents, adversary features and KL from one forward pass.

        ``pred`` is what :meth:`forward` gives for the same ``cluster``: the fixed-effects logits when it is ``None``.
        """
        features, latent_fe = self.fixed_effects.encode_features(x)
        recon_fe = self.fixed_effects.decode(latent_fe)
        pred_fe = self.fixed_effects.classify(latent_fe)
        features = [latent_fe] if self.adversary_inputs == "latent" else features + [latent_fe]
        fixed = dict(pred_fe=pred_fe, recon_fe=recon_fe, latent_fe=latent_fe, features=features)
        if self.random_effects is None:
            none = dict(pred_re=None, recon_re=None, latent_re=None, latent_cluster_logits=None)
            return AECOutput(pred=pred_fe, kl=pred_fe.new_zeros(()), **fixed, **none)
        re_aec = self.random_effects
        with cluster_context(re_aec, cluster):
            latent_re = re_aec.encoder(x)[1]
            recon_re = re_aec.decoder(latent_re)
        pred_re, cluster_logits = re_aec.latent_classifier(latent_re)
        # unseen rows of the mixed prediction are the fixed-effects head's: with detached mixer inputs the mixer's
        # loss trains nothing through them, as it trains nothing of the autoencoders
        unseen_fe = pred_fe.detach() if self.detach_mixer_inputs else pred_fe
        return AECOutput(
            pred=pred_fe if cluster is None else self._unseen_rows_fixed(cluster, unseen_fe, self._mix(latent_fe, latent_re)),
            pred_re=pred_re,
            recon_re=recon_re,
            latent_re=latent_re,
            latent_cluster_logits=cluster_logits,
            kl=total_kl_divergence(re_aec),
            **fixed,
        )

    def forward_armed(self, x: torch.Tensor, cluster: torch.Tensor | None = None) -> AECOutput:
        """Same as :meth:`forward_autoencoder`; the name that ``ARMEDTrainer`` and ``armed_ddp`` call."""
        return self.forward_autoencoder(x, cluster)
