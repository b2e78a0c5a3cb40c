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

from .armed import ARMED, ARMED_VARIANTS, INPUT_SUFFIX, default_tap_layers
from .armed_cnn import ARMEDCNN, ArmedCNN, PadToSize
from .autoencoder import (
    AEC_LOSS_WEIGHTS,
    AEC_VARIANTS,
    PAPER_AEC_CONFIG,
    PAPER_IMAGE_CLASSIFIER_CONFIG,
    AECDecoder,
    AECEncoder,
    AECLatents,
    AECOutput,
    AECReconstruction,
    AutoencoderClassifier,
    ImageClusterClassifier,
    LatentClassifier,
    MixedEffectsAutoencoder,
    RandomEffectsAutoencoder,
    aec_loss_weights,
)
from .mixed_effects_mlp import MLP_VARIANTS, MixedEffectsMLP, variant_loss_weights
from .mixed_model import ClusterInput, FactorModules, FactorSpec, MixedModelNet
from .z_predictor import ZPredictor
