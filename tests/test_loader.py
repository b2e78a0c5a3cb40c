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

import numpy as np
import pytest
import torch

from monai_armed.data import TensorBatchLoader
from monai_armed.transforms import ClusterIndexd, ClusterVocabulary


def _items():
    return [{"features": np.full(2, i, np.float32), "cluster": "ab"[i % 2]} for i in range(5)]


def test_datalist_of_indexed_items_with_and_without_cluster():
    items = _items()
    del items[3]["cluster"]
    to_index = ClusterIndexd("cluster", ClusterVocabulary(["a", "b"]), missing_as_unseen=True)
    (batch,) = TensorBatchLoader([to_index(d) for d in items], batch_size=8)
    assert batch["cluster"].tolist() == [0, 1, 0, -1, 0] and batch["cluster"].dtype == torch.int64
    assert batch["features"].shape == (5, 2)


def test_item_without_a_key_is_named():
    items = _items()
    del items[3]["cluster"]
    with pytest.raises(KeyError) as err:
        TensorBatchLoader(items, keys=["features", "cluster"])
    message = str(err.value)
    assert "1 datalist item(s) lack key 'cluster', the first is item 3" in message and "missing_as_unseen" in message


def test_a_key_that_a_mapping_lacks_is_named():
    data = {"features": torch.zeros(4, 2), "label": torch.zeros(4)}
    with pytest.raises(KeyError, match=r"keys \['lable'\] are not in the data; its keys are \['features', 'label'\]"):
        TensorBatchLoader(data, keys=["features", "lable"])


def test_raw_cluster_ids_are_named():
    with pytest.raises(TypeError, match="key 'cluster' holds non-numeric values.*'a'.*ClusterIndexd"):
        TensorBatchLoader(_items())
