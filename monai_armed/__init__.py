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
"""monai_armed: adversarially-regularized mixed-effects deep learning (ARMED) for MONAI."""

from __future__ import annotations

__version__ = "0.8.1"

from . import apps, data, engines, handlers, inferers, losses, metrics, networks, optimizers, transforms, utils, visualize
from .data import TensorBatchLoader
from .engines import ARMEDEvaluator, ARMEDTrainer, PrepareBatchCluster
from .networks import ARMED, ARMEDCNN, ClusterAdversary, MixedEffectsMLP, RandomEffects, ZPredictor
from .transforms import ClusterIndexd, ClusterVocabularies, ClusterVocabulary
