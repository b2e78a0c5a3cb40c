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
"""The segmentation bundle's ``multi_gpu_train.json`` with torchrun: 2 gloo processes on the CPU train one ARMED UNet."""

from __future__ import annotations

import json

import torch

from monai_armed.data import ensure_nucleus_dataset
from tests.bundle_workflow import torchrun_bundle
from tests.test_bundle_segmentation import CONFIGS, FIELDS, N_SEEN, N_UNSEEN, NETWORK, SIZE


def test_ddp_trains_one_model_on_two_ranks(tmp_path):
    data = tmp_path / "data"
    ensure_nucleus_dataset(data, seed=0, n_seen=N_SEEN, n_unseen=N_UNSEEN, fields_per_batch=FIELDS, size=SIZE)
    root, probe, output, _ = torchrun_bundle(
        CONFIGS, tmp_path, generate_default_data=False, dataset_dir=str(data), **NETWORK, epochs=2, batch_size=2,
        adversary_hidden=[8], val_interval=1,
    )  # fmt: skip
    ranks = [torch.load(probe / f"rank{r}.pt") for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys() and any(k.startswith("random_intercept") for k in ranks[0])
    for name, value in ranks[0].items():
        assert torch.equal(value, ranks[1][name]), name  # the ranks exchanged gradients
    saved = torch.load(root / "models" / "model.pt", weights_only=True)
    for name, value in ranks[0].items():
        assert torch.equal(saved[name], value), name
    history = json.loads((root / "eval" / "loss_history.json").read_text())
    assert history["epoch"] == [1, 2]
    assert (root / "models" / "model_best_val_mean_dice.pt").is_file()
    assert not list(root.glob("*_rank1")), "rank 1 wrote bundle files"
