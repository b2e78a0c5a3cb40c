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

"""ARMEDEvaluator's contracts around its network: which factor a Z-predictor and the per-cluster tables take with
several grouping factors, the modes it leaves behind, wrapped networks, and regression metrics of a rerun."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from monai_armed.engines import ARMEDEvaluator, PrepareBatchCluster
from monai_armed.handlers import PerClusterRegression
from monai_armed.networks import ARMED, FactorSpec, MixedEffectsMLP, MixedModelNet, ZPredictor


def _two_factor_batch():
    torch.manual_seed(0)
    net = MixedModelNet(2, {"site": FactorSpec(3), "subject": FactorSpec(3)}).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    x = torch.randn(4, 4)
    batch = {"features": x, "label": torch.randn(4), "site": torch.tensor([0, 1, 2, 0]),
             "subject": torch.tensor([2, 2, 1, 0])}  # fmt: skip
    # the batch's keys in another order than the network's factors
    return net, batch, PrepareBatchCluster("features", cluster_key=["subject", "site"])


def test_the_default_inferred_factor_is_the_networks_first_whatever_the_key_order():
    net, batch, prepare = _two_factor_batch()
    site_zp = ZPredictor(4, 3)
    evaluator = ARMEDEvaluator("cpu", [batch], net, z_predictor=site_zp, prepare_batch=prepare,
                               cluster_mode="inferred", decollate=False)  # fmt: skip
    evaluator.run()
    with torch.no_grad():
        expected = net(batch["features"], {"site": site_zp.membership(batch["features"]), "subject": batch["subject"]})
    torch.testing.assert_close(evaluator.state.output["pred"], expected)


def test_per_cluster_tables_tabulate_the_factor_they_were_checked_against():
    net, batch, prepare = _two_factor_batch()
    table = PerClusterRegression(n_clusters=3, cluster_names=["siteA", "siteB", "siteC"])
    evaluator = ARMEDEvaluator("cpu", [batch], net, prepare_batch=prepare, val_handlers=[table], task="regression")
    evaluator.run()
    counts = {name: row["n"] for name, row in evaluator.state.metric_details["per_cluster_regression"].items()}
    assert counts == {"siteA": 2, "siteB": 1, "siteC": 1}  # the sites' counts, not the subjects' [1, 1, 2]


def test_the_z_predictor_and_the_network_keep_their_modes():
    net = MixedEffectsMLP(2, 1, n_clusters=3)
    backbone = nn.Sequential(nn.Linear(2, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    z_predictor = ZPredictor(backbone=backbone, n_clusters=3)
    net.train(), z_predictor.train()
    batch = {"image": torch.randn(4, 2), "cluster": torch.tensor([0, 1, 2, -1])}
    ARMEDEvaluator("cpu", [batch], net, z_predictor=z_predictor).run()
    assert net.training and z_predictor.training  # a loop that trains it next keeps its dropout
    with pytest.raises(ValueError, match="the Z-predictor has 4 clusters but the network has 3"):
        ARMEDEvaluator("cpu", [batch], net, z_predictor=ZPredictor(2, 4))


class _TupleNet(nn.Module):
    """Returns (logits, hidden), as a ViT does: ARMED picks the logits with its prediction rule."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.fc = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = torch.relu(self.body(x))
        return self.fc(hidden), hidden


def test_a_wrapped_network_gives_its_prediction_and_its_clusters():
    net = ARMED(_TupleNet(), n_clusters=3, in_shape=(4,), head="fc").eval()
    batch = [{"image": torch.randn(5, 4), "cluster": torch.tensor([0, 1, 2, -1, 0])}]
    plain = ARMEDEvaluator("cpu", batch, net, decollate=False)
    plain.run()
    wrapped = ARMEDEvaluator("cpu", batch, nn.DataParallel(net), decollate=False, cluster_mode="randomized")
    assert wrapped.n_clusters == 3
    wrapped.cluster_mode = "observed"
    wrapped.run()
    torch.testing.assert_close(wrapped.state.output["pred"], plain.state.output["pred"])


def test_a_rerun_without_labels_leaves_no_earlier_regression_metrics():
    net = MixedEffectsMLP(2, 1, n_clusters=3)
    labelled = [{"image": torch.randn(4, 2), "label": torch.randn(4), "cluster": torch.tensor([0, 1, 2, 0])}]
    evaluator = ARMEDEvaluator("cpu", labelled, net, task="regression")
    evaluator.run()
    assert evaluator.state.metrics["mse"] > 0
    evaluator.data_loader = [{"image": torch.randn(4, 2), "cluster": torch.tensor([0, 1, 2, 0])}]
    evaluator.run()
    assert "mse" not in evaluator.state.metrics and "r2" not in evaluator.state.metrics


def test_a_train_mode_evaluation_keeps_its_gradients():
    net = MixedEffectsMLP(2, 1, n_clusters=3)
    batch = [{"image": torch.randn(4, 2), "cluster": torch.tensor([0, 1, 2, -1])}]
    evaluator = ARMEDEvaluator("cpu", batch, net, z_predictor=ZPredictor(2, 3), mode="train", decollate=False)
    evaluator.run()
    assert evaluator.state.output["pred"].requires_grad  # the Z-predictor's eval mode does not turn gradients off
