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

from .batch_effects import anova_f_by_cluster, image_quality_metrics, latent_cluster_scores, reconstruction_mse
from .binary import binary_metrics, per_cluster_binary_metrics, youden_threshold
from .clusters import cluster_groups
from .classification import (
    classification_summary,
    mean_ci95,
    per_cluster_accuracy,
    positive_probability,
    predicted_class,
)
from .regression import REGRESSION_METRICS, per_cluster_regression_metrics, regression_metrics, regression_summary
from .segmentation import label_map, per_image_segmentation_scores, segmentation_summary
