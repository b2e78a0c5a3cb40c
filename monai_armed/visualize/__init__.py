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

from .figures import (
    feature_importance,
    intercept_balance_correlation,
    plot_decision_boundaries,
    plot_feature_importance,
    plot_intercepts_vs_balance,
    plot_random_effect_spread,
    save_figure,
)
from .reconstructions import save_latent_embedding, save_reconstruction_grid
from .reports import write_image_figures, write_tabular_figures
from .saliency import fe_me_gradcam, save_gradcam_figure
from .segmentation import plot_dice_per_cluster, write_segmentation_figures
from .sites import cluster_intercepts, plot_intercept_vs_patient_fraction, plot_random_scale_spread, positive_fraction
