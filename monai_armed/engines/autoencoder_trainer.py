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
"""Ignite trainer of the ARMED autoencoder-classifier family (conventional, domain-adversarial and ARMED-AEC)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.inferers import SimpleInferer
from monai.utils import CommonKeys as Keys
from monai.utils import IgniteInfo, min_version, optional_import
from torch.nn.parallel import DistributedDataParallel

from monai_armed.engines.distributed import unwrap_armed
from monai_armed.engines.players import ImageClassifierPlayer
from monai_armed.engines.trainer import ARMEDKeys, ARMEDTrainer, _PlayerSetting
from monai_armed.networks.nets.autoencoder import AEC_LOSS_WEIGHTS, AECOutput

if TYPE_CHECKING:
    from ignite.engine import EventEnum
else:
    EventEnum, _ = optional_import(
        "ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "EventEnum", as_type="base"
    )

__all__ = ["ARMEDAutoencoderTrainer", "AECIterationEvents", "AECKeys", "AEC_LOSS_KEYS", "seen_cross_entropy"]

_W = AEC_LOSS_WEIGHTS


class AECIterationEvents(EventEnum):
    """Extra event fired by :class:`ARMEDAutoencoderTrainer` after the image-cluster-classifier step.

    Example::

        trainer.add_event_handler(AECIterationEvents.IMAGE_CLASSIFIER_COMPLETED, lambda e: ...)
    """

    IMAGE_CLASSIFIER_COMPLETED = "image_classifier_completed"


class AECKeys(ARMEDKeys):
    """Keys that :class:`ARMEDAutoencoderTrainer` adds to ``engine.state.output`` besides :class:`ARMEDKeys`.

    Example::

        LossHistory("loss_history.json", keys=AEC_LOSS_KEYS)
    """

    LOSS_RECON_FE = "loss_recon_fe"
    LOSS_RECON_RE = "loss_recon_re"
    LOSS_RE = "loss_re"
    LOSS_LATENT_CLUSTER = "loss_latent_cluster"
    LOSS_IMAGE_CLUSTER = "loss_image_cluster"
    LOSS_IMAGE_CLASSIFIER = "loss_image_classifier"


#: Every scalar an ARMED-AEC iteration logs (variant "armed" with an adversary and an image cluster classifier);
#: fixed-effects-only variants log ``loss``, ``loss_recon_fe``, ``loss_fe``, ``loss_kl`` and, with an adversary,
#: ``loss_adv``, ``adv_accuracy``, ``loss_gen``.
AEC_LOSS_KEYS = (
    Keys.LOSS,
    AECKeys.LOSS_RECON_FE,
    AECKeys.LOSS_RECON_RE,
    AECKeys.LOSS_FE,
    AECKeys.LOSS_RE,
    AECKeys.LOSS_ME,
    AECKeys.LOSS_ADV,
    AECKeys.ADV_ACCURACY,
    AECKeys.LOSS_GEN,
    AECKeys.LOSS_LATENT_CLUSTER,
    AECKeys.LOSS_IMAGE_CLUSTER,
    AECKeys.LOSS_IMAGE_CLASSIFIER,
    AECKeys.LOSS_KL,
)


def seen_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the rows of seen clusters (``target >= 0``); 0 when the batch has none.

    ``nn.CrossEntropyLoss(ignore_index=-1)`` returns NaN for a batch of unseen clusters only; this returns 0.

    Example::

        seen_cross_entropy(torch.randn(3, 4), torch.tensor([2, -1, 0]))    # mean over rows 0 and 2
    """
    total = F.cross_entropy(logits, target, ignore_index=-1, reduction="sum")
    return total / (target >= 0).sum().clamp(min=1).to(total.dtype)


class ARMEDAutoencoderTrainer(ARMEDTrainer):
    """Ignite trainer for the ARMED autoencoder-classifiers (:class:`~monai_armed.networks.nets.MixedEffectsAutoencoder`).

    Each iteration runs one forward pass of ``network.forward_autoencoder(image, cluster)`` and then (armed_method.md
    section 3.3, with the paper's mixing subnetwork):

    1. adversary step: ``adv_loss_function(adversary(features.detach()), cluster)`` updates the adversary only
       (skipped without an adversary);
    2. image-cluster-classifier step on the real images: ``CE(image_classifier(image), cluster)`` updates the
       classifier only (variants with random effects, when one is given);
    3. main step, with the adversary and the image classifier frozen (their just-updated weights are used)::

           loss = recon_weight * MSE(x, recon_fe) + cls_weight * task(pred_fe) - adv_weight * CE(adversary(features), z)
                + recon_re_weight * MSE(x, recon_re) + re_cls_weight * task(pred_re) + mix_weight * task(pred)
                + latent_cluster_weight * CE(latent_cluster_logits, z) + image_cluster_weight * CE(image_classifier(recon_re), z)
                + kl_weight * KL / n_train

       The adversarial term is subtracted (the fixed-effects latent must lose the batch information; the reference's
       ``MixedEffectsAEC`` adds it, a bug); the two cluster terms are added, i.e. minimised ("domain-enhancing": the
       random-effects latent and reconstruction must keep the batch information).

    This is a joint schedule. With the network's default ``detach_mixer_inputs=True`` the fixed-effects AEC, the
    random-effects AEC and the mixer share no gradient, so it equals the paper's separately trained DA-AEC (or AEC),
    RE-AEC and mixer (with per-parameter optimizers such as Adam). Every cluster cross-entropy ignores ``-1`` rows
    (soft clusters use their arg-max). The image classifier stays in training mode in the main step as in the
    reference, so its BatchNorm statistics also see the reconstructions.

    ``engine.state.output`` holds (detached) ``loss`` (the objective above), ``loss_recon_fe``, ``loss_fe``,
    ``loss_kl`` and, when the variant has them, ``loss_recon_re``, ``loss_re``, ``loss_me``, ``loss_latent_cluster``,
    ``loss_image_cluster``, ``loss_image_classifier``, ``loss_adv``, ``adv_accuracy``, ``loss_gen`` (see
    :data:`AEC_LOSS_KEYS`); ``pred`` (mixed-effects logits) and ``pred_fe``. Parts are logged even when their weight
    is 0. Every weight is a plain attribute (``mix_weight`` and ``cls_weight`` are the inherited ``me_weight`` and
    ``fe_weight``). AMP (CUDA), gradient accumulation, ``adversary_update="simultaneous"`` and DDP (network,
    adversary and image classifier each through :func:`~monai_armed.engines.armed_ddp`) work as in
    :class:`ARMEDTrainer`. Save ``adversary``, ``image_classifier`` and their optimizers beside the network to
    resume.

    Args:
        device: device of the engine.
        max_epochs: number of epochs.
        train_data_loader: dictionary batches with ``image``, ``label`` and ``cluster``.
        network: a network with ``forward_autoencoder(x, cluster) -> AECOutput``, or ``armed_ddp(network)``.
        optimizer: optimizer of the network's parameters.
        loss_function: task loss on logits; default :class:`~monai_armed.losses.LogitClassificationLoss`.
        adversary: cluster classifier over ``AECOutput.features`` (``ClusterAdversary(net.feature_channels, C)``),
            or ``None``.
        adv_optimizer: optimizer of the adversary; default ``Adam(lr=1e-3)``.
        adv_loss_function: adversary loss; default :func:`seen_cross_entropy`.
        image_classifier: :class:`~monai_armed.networks.nets.ImageClusterClassifier` (or any image -> cluster
            logits network) for variants with random effects, or ``None`` (no image-cluster terms).
        image_classifier_optimizer: its optimizer; default ``Adam(lr=1e-3)``.
        cluster_loss_function: loss of the latent and image cluster terms and of the image classifier's step;
            default :func:`seen_cross_entropy`.
        recon_loss_function: reconstruction loss; default ``nn.MSELoss()``.
        recon_weight: weight of the fixed-effects reconstruction.
        cls_weight: weight of the fixed-effects task loss.
        adv_weight: weight of the adversarial term, subtracted.
        recon_re_weight: weight of the random-effects reconstruction.
        re_cls_weight: weight of the random-effects latent's target head.
        mix_weight: weight of the mixed-effects (mixer) task loss.
        latent_cluster_weight: weight of the random-effects latent's cluster head (added).
        image_cluster_weight: weight of the image classifier's loss on the RE reconstruction (added).
        kl_weight: weight of the summed KL divergence of the random effects, divided by ``n_train`` (the ELBO per
            sample, as in :class:`ARMEDTrainer`).
        adversary_update: ``"sequential"`` (default) or ``"simultaneous"`` (gradient reversal).
        prepare_batch: default :class:`~monai_armed.engines.PrepareBatchCluster`.
        kwargs: further ``SupervisedTrainer`` arguments (``compile`` compiles ``forward_armed``; an ``inferer`` other
            than a ``SimpleInferer`` is refused: the autoencoder runs on whole images).

    Raises:
        TypeError: the network has no ``forward_autoencoder``.
        ValueError: an image classifier for a network without random effects, or wrapped unlike the network.

    Example::

        net = MixedEffectsAutoencoder(2, (1, 64, 64), out_channels=1, n_clusters=6, variant="armed")
        adversary = ClusterAdversary(net.feature_channels, n_clusters=6, hidden_channels=(64, 32))
        judge = ImageClusterClassifier(2, in_channels=1, n_clusters=6)
        trainer = ARMEDAutoencoderTrainer(
            device="cpu", max_epochs=10, train_data_loader=loader, network=net,
            optimizer=torch.optim.Adam(net.parameters(), 1e-4), adversary=adversary, image_classifier=judge,
            **aec_loss_weights("armed"),
        )
        trainer.run()
    """

    image_classifier = _PlayerSetting("image_classifier", "module", settable=False)
    image_classifier_optimizer = _PlayerSetting("image_classifier", "optimizer", settable=False)
    image_scaler = _PlayerSetting("image_classifier", "scaler")
    image_cluster_weight = _PlayerSetting("image_classifier", "weight")
    cluster_loss_function = _PlayerSetting("image_classifier", "loss_function")

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Any,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_function: Callable | None = None,
        adversary: nn.Module | None = None,
        adv_optimizer: torch.optim.Optimizer | None = None,
        adv_loss_function: Callable | None = None,
        image_classifier: nn.Module | None = None,
        image_classifier_optimizer: torch.optim.Optimizer | None = None,
        cluster_loss_function: Callable | None = None,
        recon_loss_function: Callable | None = None,
        recon_weight: float = _W["recon_weight"],
        cls_weight: float = _W["cls_weight"],
        adv_weight: float = _W["adv_weight"],
        recon_re_weight: float = _W["recon_re_weight"],
        re_cls_weight: float = _W["re_cls_weight"],
        mix_weight: float = _W["mix_weight"],
        latent_cluster_weight: float = _W["latent_cluster_weight"],
        image_cluster_weight: float = _W["image_cluster_weight"],
        kl_weight: float = _W["kl_weight"],
        adversary_update: str = "sequential",
        prepare_batch: Callable | None = None,
        **kwargs: Any,
    ) -> None:
        inferer = kwargs.get("inferer")
        if inferer is not None and type(inferer) is not SimpleInferer:
            raise ValueError(
                "ARMEDAutoencoderTrainer runs the autoencoder on whole images (its in_shape is fixed), so it takes no "
                f"inferer; got {type(inferer).__name__}. Pass inferer=None (or a SimpleInferer)."
            )
        module = unwrap_armed(network)
        if not callable(getattr(module, "forward_autoencoder", None)):
            raise TypeError(
                f"ARMEDAutoencoderTrainer needs a network with forward_autoencoder(x, cluster) -> AECOutput; "
                f"{type(module).__name__} has none (use monai_armed.networks.nets.MixedEffectsAutoencoder)."
            )
        if image_classifier is not None:
            if not getattr(module, "has_random_effects", True):
                raise ValueError(
                    "image_classifier judges the random-effects reconstruction, but the network (variant "
                    f"{getattr(module, 'variant', '?')!r}) has no random effects; pass image_classifier=None."
                )
            if isinstance(network, DistributedDataParallel) != isinstance(image_classifier, DistributedDataParallel):
                raise ValueError(
                    "ARMEDAutoencoderTrainer needs the network and the image classifier both plain or both "
                    f"DistributedDataParallel (armed_ddp), got network={type(network).__name__}, "
                    f"image_classifier={type(image_classifier).__name__}."
                )
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=loss_function,
            adversary=adversary,
            adv_optimizer=adv_optimizer,
            adv_loss_function=adv_loss_function or seen_cross_entropy,
            me_weight=mix_weight,
            fe_weight=cls_weight,
            adv_weight=adv_weight,
            kl_weight=kl_weight,
            adversary_update=adversary_update,
            prepare_batch=prepare_batch,
            **kwargs,
        )
        self.register_events(*AECIterationEvents)
        self.cluster_loss_function = cluster_loss_function or seen_cross_entropy
        self.recon_loss_function = recon_loss_function or nn.MSELoss()
        self.recon_weight, self.recon_re_weight, self.re_cls_weight = recon_weight, recon_re_weight, re_cls_weight
        self.latent_cluster_weight, self.image_cluster_weight = latent_cluster_weight, image_cluster_weight
        if image_classifier is not None:
            self.players["image_classifier"] = ImageClassifierPlayer(
                image_classifier, image_classifier_optimizer, self.cluster_loss_function, image_cluster_weight,
                AECIterationEvents.IMAGE_CLASSIFIER_COMPLETED,
            )  # fmt: skip
            if isinstance(image_classifier, DistributedDataParallel):
                self._ddp_modules = self._ddp_modules + (image_classifier,)

    @property
    def mix_weight(self) -> float:
        """Weight of the mixed-effects task loss (the inherited ``me_weight``)."""
        return self.me_weight

    @mix_weight.setter
    def mix_weight(self, value: float) -> None:
        self.me_weight = value

    @property
    def cls_weight(self) -> float:
        """Weight of the fixed-effects task loss (the inherited ``fe_weight``)."""
        return self.fe_weight

    @cls_weight.setter
    def cls_weight(self, value: float) -> None:
        self.fe_weight = value

    def _forward(self, inputs: torch.Tensor, cluster: torch.Tensor) -> AECOutput:
        return self._batch_forward_armed(inputs, cluster)

    def _main_loss(self, out: AECOutput, inputs: torch.Tensor, targets: torch.Tensor, cluster: Any) -> torch.Tensor:
        return self._autoencoder_loss(out, inputs, targets, self._adversary_target(cluster))

    def _autoencoder_loss(
        self, out: AECOutput, inputs: torch.Tensor, targets: torch.Tensor, cluster_target: torch.Tensor
    ) -> torch.Tensor:
        """The weighted reconstruction, task and latent-cluster terms, logging each part."""
        self._check_task_loss_fits(out.pred_fe)
        parts = [
            (AECKeys.LOSS_RECON_FE, self.recon_weight, self.recon_loss_function(out.recon_fe, inputs)),
            (AECKeys.LOSS_FE, self.cls_weight, self.loss_function(out.pred_fe, targets, **self._loss_kwargs).mean()),
        ]
        if out.recon_re is not None:
            parts += [
                (AECKeys.LOSS_RECON_RE, self.recon_re_weight, self.recon_loss_function(out.recon_re, inputs)),
                (AECKeys.LOSS_RE, self.re_cls_weight, self.loss_function(out.pred_re, targets, **self._loss_kwargs).mean()),
                (AECKeys.LOSS_ME, self.mix_weight, self.loss_function(out.pred, targets, **self._loss_kwargs).mean()),
                (
                    AECKeys.LOSS_LATENT_CLUSTER,
                    self.latent_cluster_weight,
                    self.cluster_loss_function(out.latent_cluster_logits, cluster_target),
                ),
            ]
        loss = out.pred_fe.new_zeros(())
        for key, weight, part in parts:
            self.state.output[key] = part.detach()
            if weight:
                loss = loss + weight * part
        return loss
