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

import re
from pathlib import Path

import numpy as np
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_api_tour_runs(tmp_path, monkeypatch):
    """The README's API tour trains on a CSV with a 'site' column and predicts with and without clusters."""
    features = np.random.RandomState(0).randn(300, 3)
    rows = [f"{a},{b},{c},{i % 2},site{i % 6}" for i, (a, b, c) in enumerate(features)]
    (tmp_path / "my_data.csv").write_text("\n".join(["f0,f1,f2,label,site", *rows]) + "\n")
    code = re.search(r"## API tour\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    tour, prediction = code.split("net.eval()")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(tour, "README API tour", "exec"), namespace)
    output = namespace["trainer"].state.output
    assert {"loss", "loss_me", "loss_fe", "loss_adv", "loss_gen", "loss_kl"} <= set(output.keys())
    net = namespace["net"]
    namespace.update(x=torch.randn(4, 3), cluster=torch.tensor([0, 1, -1, 2]))
    exec(compile("net.eval()" + prediction.split("evaluator =")[0], "README prediction", "exec"), namespace)
    assert namespace["logits_me"].shape == (4, 1)
    assert torch.equal(namespace["logits_me"][2], namespace["logits_fe"][2])  # unseen cluster: fixed effects
    assert net.n_clusters == 4  # 6 sites, 2 held out as unseen
