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

import warnings

from .datasets import (
    ensure_spiral_dataset,
    load_image_datalist,
    make_spiral_dataset,
    spiral_radii_file,
    spiral_true_boundaries,
    split_by_cluster,
)
from .formula import FactorDesign, MixedDesign, MixedFormula, RandomTerm, build_design, parse_mixed_formula
from .generated import ForeignFilesError
from .loader import TensorBatchLoader
from .microscopy import (
    PHENOTYPES,
    apply_batch_signature,
    ensure_microscopy_dataset,
    make_cell_morphology,
    make_microscopy_batches,
    make_microscopy_dataset,
    render_cell,
    simulate_cell_image,
)
from .nuclei import ensure_nucleus_dataset, make_nucleus_batches, make_nucleus_dataset, render_nucleus_field
from .provenance import (
    PREPROCESSING_FILE,
    TRAINING_ITEMS_FILE,
    TRAINING_SPLIT_FILE,
    check_evaluated_items,
    check_preprocessing,
    check_training_split,
    image_content,
    image_id,
    record_preprocessing,
    record_training_items,
    recorded_preprocessing,
    record_training_split,
)
from .mri import (
    DEFAULT_VENDOR_AD_FRACTION,
    MNI_RIGHT_HIPPOCAMPUS,
    ensure_mri_dataset,
    make_mri_dataset,
    make_mri_sites,
    simulate_mri_image,
)
from .spirals import (
    make_spiral_random_radius,
    make_spiral_random_radius_confounder,
    make_spiral_random_slope,
    make_spiral_true_boundary,
    make_spirals,
    spirals_to_datalist,
)
from .tabular import (
    TABULAR_TASKS,
    check_output_path,
    csv_feature_columns,
    datalist_to_arrays,
    load_csv_datalist,
    save_csv_datalist,
    save_predictions_csv,
)
from .tiff import TIFF_SUFFIXES, TiffFileReader, TiffImage, save_tiff
from .validation import check_intensity_use, validate_datalist, validate_segmentation_datalist

# `python -m monai_armed.data.mri` (or `.microscopy`) runs a module this package has already imported; that is intended, so runpy's
# "found in sys.modules ... unpredictable behaviour" warning about exactly that module is silenced.
for _module in ("mri", "microscopy", "nuclei"):
    warnings.filterwarnings(
        "ignore", message=f"'monai_armed.data.{_module}' found in sys.modules", category=RuntimeWarning
    )
