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

from . import blocks, layers, nets
from .blocks import ClusterAdversary, ClusterScaleBias, cluster_context, cluster_norm_modules
from .layers import GradientReversal, RandomEffects
from .nets import (
    AEC_VARIANTS,
    ARMED,
    ARMED_VARIANTS,
    ARMEDCNN,
    MLP_VARIANTS,
    PAPER_AEC_CONFIG,
    PAPER_IMAGE_CLASSIFIER_CONFIG,
    AECOutput,
    AutoencoderClassifier,
    ImageClusterClassifier,
    MixedEffectsAutoencoder,
    FactorModules,
    FactorSpec,
    MixedEffectsMLP,
    MixedModelNet,
    RandomEffectsAutoencoder,
    ZPredictor,
    aec_loss_weights,
    default_tap_layers,
    variant_loss_weights,
)
from .utils import (
    ARMEDOutput,
    cluster_one_hot,
    glorot_init,
    load_network_checkpoint,
    random_effects_modules,
    random_effects_summary,
    total_kl_divergence,
)
