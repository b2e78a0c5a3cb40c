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

from .autoencoder_outputs import (
    DEFAULT_OOD_QUANTILE,
    AutoencoderOutputWriter,
    fit_ood_threshold,
    read_ood_threshold,
    write_autoencoder_outputs,
)
from .autoencoder_report import AutoencoderReport
from .checkpoints import AtomicCheckpointSaver, AtomicDiskSaver, checkpoint_load_dict, latest_checkpoint
from .cluster_mode_report import ClusterModeReport, dataset_modes, format_report_table
from .image_outputs import ImageOutputWriter, file_stem
from .loss_history import LOSS_KEYS, LossHistory
from .loss_weight_schedule import LOSS_WEIGHT_SCHEDULES, LossWeightSchedule
from .per_cluster_accuracy import PerClusterAccuracy
from .per_cluster_regression import PerClusterRegression
from .prediction_collector import PredictionCollector, output_field
from .random_effects_summary import RandomEffectsSummary
from .random_states import RandomStates
from .run_logs import run_log_dir, tracking_run_name
from .run_params import RunParams
from .report_logger import ReportLogger, flatten_report
from .segmentation_outputs import SegmentationWriter
