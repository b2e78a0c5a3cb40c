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

import copy
import unittest
from unittest import mock

import torch
from ignite.engine import Events
from monai.data import MetaTensor

from monai_armed.engines import ARMEDEvaluator, PrepareBatchCluster, is_compiled, unwrap_armed
from monai_armed.inferers import cluster_inference
from monai_armed.networks import ClusterAdversary, MixedEffectsMLP
from tests.test_autoencoder_trainer import _images
from tests.test_autoencoder_trainer import _models as _autoencoder_models
from tests.test_autoencoder_trainer import _trainer as _autoencoder_trainer
from tests.test_engines import N_CLUSTERS, _flat, _loader, _problem, _trainer


class GraphCounter:
    """A ``torch.compile`` backend that counts the graphs dynamo captured and runs them eagerly (no code generation, so
    the compiled run is fast and takes exactly the eager run's operations)."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, graph_module: torch.fx.GraphModule, example_inputs: list) -> callable:
        self.graphs += 1
        return graph_module.forward


def _models(seed: int = 0):
    torch.manual_seed(seed)
    net = MixedEffectsMLP.from_variant("armed", in_features=2, out_channels=1, n_clusters=N_CLUSTERS)
    return net, ClusterAdversary(net.feature_channels, n_clusters=N_CLUSTERS, hidden_channels=(8, 8))


class TestCompiledTraining(unittest.TestCase):
    def setUp(self):
        torch._dynamo.reset()

    def test_compile_compiles_forward_armed_and_trains_as_eager(self):
        # MONAI's compile=True compiles network.forward, which the trainer never calls: before 0.8.1 it trained eagerly
        runs = {}
        for compiled in (False, True):
            net, adv = _models()
            counter = GraphCounter()
            kwargs = {"compile": True, "compile_kwargs": {"backend": counter}} if compiled else {}
            trainer = _trainer(_loader(64, batch_size=16), net, adv, epochs=2, **kwargs)
            torch.manual_seed(1)
            trainer.run()
            runs[compiled] = (_flat(net), _flat(adv), counter.graphs)
        self.assertEqual(runs[False][2], 0)
        self.assertGreater(runs[True][2], 0)
        torch.testing.assert_close(runs[True][0], runs[False][0])
        torch.testing.assert_close(runs[True][1], runs[False][1])

    def test_compiled_players_network_train(self):
        net, adv = _models()
        counter = GraphCounter()
        before = _flat(adv)
        trainer = _trainer(_loader(64, batch_size=16), net, torch.compile(adv, backend=counter), epochs=1)
        trainer.run()
        self.assertGreater(counter.graphs, 0)
        self.assertFalse(torch.equal(_flat(adv), before))

    def test_autoencoder_trainer_compiles_and_strips_metadata(self):
        data = _images(48)
        batches = [{**{k: v[i : i + 16] for k, v in data.items()}, "image": MetaTensor(data["image"][i : i + 16])}
                   for i in (0, 16, 32)]  # fmt: skip
        net, adv, judge = _autoencoder_models("armed")
        counter = GraphCounter()
        trainer = _autoencoder_trainer(data, net, adv, judge, 3, compile=True, compile_kwargs={"backend": counter})
        trainer.data_loader = batches  # MetaTensor images, as MONAI's loaders give (TensorBatchLoader's are plain)
        compiled, inputs = trainer._forward_armed, []
        trainer._forward_armed = lambda x, cluster: (inputs.append(type(x)), compiled(x, cluster))[1]
        before = _flat(net)
        trainer.run()
        self.assertGreater(counter.graphs, 0)
        self.assertFalse(torch.equal(_flat(net), before))
        # the first batch, whose values are checked, runs eagerly (its device reads would split the compiled graph)
        self.assertEqual(inputs, [torch.Tensor, torch.Tensor], "the compiled forward gets the later batches, plain")

    def test_compile_with_validate_batches_says_that_nothing_is_compiled(self):
        net, adv = _models()
        counter = GraphCounter()
        with self.assertWarnsRegex(UserWarning, "validate_batches=True runs every batch eagerly"):
            trainer = _trainer(_loader(32, batch_size=16), net, adv, epochs=1, validate_batches=True, compile=True,
                               compile_kwargs={"backend": counter})  # fmt: skip
        trainer.run()
        self.assertEqual(counter.graphs, 0)

    def test_compiled_network_is_refused_with_the_way_to_compile(self):
        net, adv = _models()
        with self.assertRaisesRegex(TypeError, r"torch\.compile\(network\) does not compile.*compile=True"):
            _trainer(_loader(64), torch.compile(net), adv)


class TestCompiledEvaluation(unittest.TestCase):
    def setUp(self):
        torch._dynamo.reset()
        net, _ = _models()
        self.net = net.eval()
        x, y, c = _problem(32)
        meta = {"filename_or_obj": "rows.csv"}
        self.batches = [{"features": MetaTensor(x[i : i + 16], meta=meta), "label": y[i : i + 16], "cluster": c[i : i + 16]}
                        for i in (0, 16)]  # fmt: skip

    def _predict(self, network, **kwargs) -> tuple[torch.Tensor, list]:
        evaluator = ARMEDEvaluator(
            device="cpu", val_data_loader=self.batches, network=network,
            prepare_batch=PrepareBatchCluster("features"), decollate=False, **kwargs,
        )  # fmt: skip
        preds = []
        evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: preds.append(e.state.output["pred"]))
        evaluator.run()
        return torch.cat([p.as_tensor() if isinstance(p, MetaTensor) else p for p in preds]), preds

    def test_compile_gives_the_eager_predictions_with_the_inputs_metadata(self):
        eager, _ = self._predict(self.net)
        for kwargs in ({"compile": True, "compile_kwargs": {"backend": GraphCounter()}}, {}):
            counter = kwargs.get("compile_kwargs", {}).get("backend") or GraphCounter()
            network = self.net if kwargs else torch.compile(copy.deepcopy(self.net), backend=counter)
            inputs = []
            with mock.patch("monai_armed.engines.evaluator.cluster_inference",
                            side_effect=lambda inferer, x, *args: inputs.append(type(x)) or cluster_inference(inferer, x, *args)):
                pred, batches = self._predict(network, **kwargs)  # fmt: skip
            self.assertGreater(counter.graphs, 0)
            self.assertEqual(inputs, [torch.Tensor, torch.Tensor], "the compiled network gets plain tensors")
            torch.testing.assert_close(pred, eager)
            self.assertTrue(all(isinstance(p, MetaTensor) for p in batches), "pred gets the inputs' metadata back")
            self.assertEqual(batches[0].meta["filename_or_obj"], "rows.csv")

    def test_unwrap_compiled(self):
        compiled = torch.compile(self.net, backend=GraphCounter())
        self.assertTrue(is_compiled(compiled))
        self.assertFalse(is_compiled(self.net))
        self.assertIs(unwrap_armed(compiled), self.net)


if __name__ == "__main__":
    unittest.main()
