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

import json
import socket
import tempfile
import unittest
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ignite.engine import Engine, Events

from monai_armed.engines import ARMEDTrainer, PrepareBatchCluster
from monai_armed.handlers import LossHistory
from monai_armed.networks import ClusterAdversary, MixedEffectsMLP
from tests.test_engines import N_CLUSTERS, _problem

# two epochs of three iterations: loss = 1, 2, 3 then 4, 5, 6; loss_kl = 10 x loss; adv_accuracy only in epoch 2
OUTPUTS = [
    {"loss": torch.tensor(float(i)), "loss_kl": torch.tensor(10.0 * i), "pred": torch.zeros(4, 1), "label": 0}
    for i in range(1, 7)
]
for _out in OUTPUTS[3:]:
    _out["adv_accuracy"] = torch.tensor(0.5)


def _engine() -> Engine:
    """An engine whose output is the batch it is given."""
    return Engine(lambda engine, batch: batch)


def _decollate(output: dict, n: int = 3) -> list[dict]:
    """MONAI's decollated form: one dict per sample, the scalars replicated."""
    return [{k: v[i] if isinstance(v, torch.Tensor) and v.ndim else v for k, v in output.items()} for i in range(n)]


class TestLossHistory(unittest.TestCase):
    def test_epoch_means_written_as_columns(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "sub" / "loss_history.json"
            history = LossHistory(path)
            engine = _engine()
            history.attach(engine)
            history.attach(engine)  # no double registration
            engine.run(OUTPUTS, max_epochs=2, epoch_length=3)
            written = json.loads(path.read_text())
        self.assertEqual(written, history.history)
        self.assertEqual(written["epoch"], [1, 2])
        self.assertEqual(written["loss"], [2.0, 5.0])
        self.assertEqual(written["loss_kl"], [20.0, 50.0])
        self.assertEqual(written["adv_accuracy"], [None, 0.5])  # absent in epoch 1
        self.assertEqual(set(written), {"epoch", "loss", "loss_kl", "adv_accuracy"})  # no pred / label

    def test_decollated_output_and_explicit_keys(self):
        history = LossHistory(None, keys=["loss_kl"])
        engine = _engine()
        history.attach(engine)
        engine.run([_decollate(o) for o in OUTPUTS], max_epochs=2, epoch_length=3)
        self.assertEqual(history.history, {"epoch": [1, 2], "loss_kl": [20.0, 50.0]})

    def test_bad_keys_and_outputs_are_named(self):
        engine = _engine()
        LossHistory(None, keys=["loss", "loss_me"]).attach(engine)
        with self.assertRaisesRegex(KeyError, r"has no \['loss_me'\]; it has \['label', 'loss', 'loss_kl', 'pred'\]"):
            engine.run(OUTPUTS, max_epochs=1, epoch_length=3)
        engine = _engine()
        LossHistory(None, keys=["pred"]).attach(engine)
        with self.assertRaisesRegex(ValueError, r"records scalars; engine.state.output\['pred'\] has shape \(4, 1\)"):
            engine.run(OUTPUTS, max_epochs=1, epoch_length=3)
        engine = _engine()
        LossHistory(None).attach(engine)
        with self.assertRaisesRegex(TypeError, "dict .or a decollated list of dicts., got Tensor"):
            engine.run([torch.zeros(2)], max_epochs=1)
        with self.assertRaisesRegex(TypeError, "got the string 'loss'"):
            LossHistory(None, keys="loss")

    def test_resumed_run_keeps_earlier_epochs(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "loss_history.json"
            first = _engine()
            LossHistory(path).attach(first)
            first.run(OUTPUTS[:3] * 3, max_epochs=3, epoch_length=3)  # epochs 1-3, loss 2 each
            resumed = _engine()
            history = LossHistory(path)
            history.attach(resumed)

            @resumed.on(Events.STARTED)
            def _restore(engine):  # what a CheckpointLoader does: the run continues after epoch 2
                engine.state.epoch = 2
                engine.state.iteration = 6

            resumed.run(OUTPUTS[3:], max_epochs=3, epoch_length=3)
            written = json.loads(path.read_text())
            self.assertEqual(written["epoch"], [1, 2, 3])
            self.assertEqual(written["loss"], [2.0, 2.0, 5.0])  # epoch 3 retrained, 1-2 kept

            path.write_text("{not json")
            broken = _engine()
            LossHistory(path).attach(broken)
            broken.add_event_handler(Events.STARTED, _restore)
            with self.assertRaisesRegex(ValueError, r"cannot resume from .*loss_history.json: expected JSON with"):
                broken.run(OUTPUTS[3:], max_epochs=3, epoch_length=3)

    def test_the_same_handler_on_a_run_restored_to_an_earlier_epoch_replaces_those_epochs(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "loss_history.json"
            history = LossHistory(path)
            first = _engine()
            history.attach(first)
            first.run(OUTPUTS[:3] * 3, max_epochs=3, epoch_length=3)  # epochs 1-3, loss 2 each
            resumed = _engine()
            history.attach(resumed)

            @resumed.on(Events.STARTED)
            def _restore(engine):  # restored from the epoch-2 checkpoint, in the same process
                engine.state.epoch = 2
                engine.state.iteration = 6

            resumed.run(OUTPUTS[3:] * 2, max_epochs=4, epoch_length=3)
            self.assertEqual(history.history["epoch"], [1, 2, 3, 4])
            self.assertEqual(history.history["loss"], [2.0, 2.0, 5.0, 5.0])
            self.assertEqual(json.loads(path.read_text())["epoch"], [1, 2, 3, 4])

    def test_armed_trainer_parts_are_recorded(self):
        x, y, c = _problem(32, seed=1)
        torch.manual_seed(0)
        net = MixedEffectsMLP(2, 1, n_clusters=N_CLUSTERS)
        trainer = ARMEDTrainer(
            device="cpu",
            max_epochs=2,
            train_data_loader=[
                {"features": x[i : i + 8], "label": y[i : i + 8], "cluster": c[i : i + 8]} for i in (0, 8)
            ],
            network=net,
            optimizer=torch.optim.Adam(net.parameters(), lr=0.01),
            adversary=ClusterAdversary(net.feature_channels, n_clusters=N_CLUSTERS, hidden_channels=(4,)),
            prepare_batch=PrepareBatchCluster("features"),
            n_train=16,  # a list of batches does not say how many rows it holds
        )  # decollates by default
        history = LossHistory(None)
        history.attach(trainer)
        losses: list[float] = []
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output[0]["loss"])))
        trainer.run()
        armed_parts = {"loss", "loss_me", "loss_fe", "loss_adv", "loss_gen", "loss_kl", "adv_accuracy"}
        self.assertEqual(set(history.history), {"epoch", *armed_parts})
        self.assertAlmostEqual(history.history["loss"][1], sum(losses[2:]) / 2, places=5)


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        engine = _engine()
        # each process writes to its own path, so the test sees which of them wrote
        history = LossHistory(Path(out_dir) / f"rank{rank}.json")
        local = LossHistory(None, average_processes=False)
        history.attach(engine)
        local.attach(engine)
        # rank 0 logs 1, 2 per epoch, rank 1 logs 3, 4 and has loss_kl in one iteration only
        outputs = [{"loss": torch.tensor(1.0 + 2 * rank)}, {"loss": torch.tensor(2.0 + 2 * rank)}]
        if rank == 1:
            outputs[0]["loss_kl"] = torch.tensor(8.0)
        engine.run(outputs, max_epochs=1)
    finally:
        dist.destroy_process_group()
    torch.save({"history": history.history, "local": local.history}, Path(out_dir) / f"result{rank}.pt")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TestLossHistoryDistributed(unittest.TestCase):
    def test_means_over_processes_written_by_rank0(self):
        with tempfile.TemporaryDirectory() as out_dir:
            mp.start_processes(_worker, args=(_free_port(), out_dir), nprocs=2, join=True, start_method="fork")
            results = [torch.load(Path(out_dir) / f"result{r}.pt") for r in range(2)]
            written = json.loads((Path(out_dir) / "rank0.json").read_text())
            self.assertFalse((Path(out_dir) / "rank1.json").exists())
        # loss: (1 + 2 + 3 + 4) / 4; loss_kl: one iteration of rank 1 in the whole group
        expected = {"epoch": [1], "loss": [2.5], "loss_kl": [8.0]}
        self.assertEqual(written, expected)
        self.assertEqual(results[0]["history"], expected)
        self.assertEqual(results[1]["history"], expected)
        self.assertEqual(results[0]["local"], {"epoch": [1], "loss": [1.5]})
        self.assertEqual(results[1]["local"], {"epoch": [1], "loss": [3.5], "loss_kl": [8.0]})


if __name__ == "__main__":
    unittest.main()
