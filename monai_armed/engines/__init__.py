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

from .autoencoder_inferer import AutoencoderInferer
from .autoencoder_trainer import AEC_LOSS_KEYS, AECIterationEvents, AECKeys, ARMEDAutoencoderTrainer, seen_cross_entropy
from .compiled import is_compiled, plain_tensor, with_meta_of
from .distributed import ARMEDForward, armed_ddp, broadcast_buffers, gather_shards, gathers_shards, is_sharded, unwrap_armed
from .evaluator import CLUSTER_MODES, TASKS, ARMEDEvaluator, resolve_cluster
from .mldg import MLDG_DEFAULTS, train_mldg
from .output import EPOCH_METRIC_PREFIX, EpochMeans, IterationOutput, ScalarSums, iteration_scalars
from .players import AdversaryPlayer, ImageClassifierPlayer, Player
from .prepare_batch import PrepareBatchCluster, PrepareBatchClusterTarget, prepare_cluster_batch
from .trainer import ARMEDIterationEvents, ARMEDKeys, ARMEDTrainer
