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

import csv
import json
import socket
import tempfile
import unittest
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ignite.engine import Engine, Events
from torch.nn.parallel import DistributedDataParallel
from monai.data import DistributedSampler as MonaiDistributedSampler
from torch.utils.data import DataLoader, DistributedSampler

from monai_armed.engines import ARMEDEvaluator, ARMEDForward, ARMEDTrainer, PrepareBatchCluster, armed_ddp, unwrap_armed
from monai_armed.handlers import ClusterModeReport, LossHistory, PerClusterAccuracy, RandomStates, SegmentationWriter
from monai_armed.networks import ClusterAdversary, MixedEffectsMLP
from tests.test_engines import N_CLUSTERS, _problem

WORLD_SIZE = 2
N_SAMPLES, GLOBAL_BATCH, EPOCHS = 64, 16, 3
LOSS_KEYS = ("loss", "loss_me", "loss_fe", "loss_adv", "loss_gen", "loss_kl")
# (adversary_update, accumulation_steps): the sequential path with a frozen, unwrapped adversary in the main step,
# and the gradient-reversal path with both DDP wrappers in one backward pass plus no_sync accumulation
CONFIGS = (("sequential", 1), ("simultaneous", 2))


def _dataset() -> list[dict]:
    x, y, c = _problem(N_SAMPLES, seed=3)
    return [{"features": x[i], "label": y[i], "cluster": c[i]} for i in range(N_SAMPLES)]


def _models() -> tuple[MixedEffectsMLP, ClusterAdversary]:
    torch.manual_seed(0)
    # one posterior draw per cluster and forward pass (not per row): it depends on the generator state only, so every
    # process makes the very draw of the single-process run (see TestDDPMatchesSingleProcess)
    net = MixedEffectsMLP(2, 1, n_clusters=N_CLUSTERS, re_kwargs={"sample_per_row": False})
    return net, ClusterAdversary(net.feature_channels, n_clusters=N_CLUSTERS, hidden_channels=(8, 8))


def _train(world_size: int, rank: int, adversary_update: str, accumulation_steps: int) -> dict:
    """Trains from seed 0 on a ``1/world_size`` shard of every global batch; returns the losses and parameters."""
    net, adv = _models()
    sampler = DistributedSampler(_dataset(), num_replicas=world_size, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(sampler.dataset, batch_size=GLOBAL_BATCH // world_size, sampler=sampler)
    wrap = armed_ddp if world_size > 1 else (lambda module: module)
    trainer = ARMEDTrainer(
        device="cpu",
        max_epochs=EPOCHS,
        train_data_loader=loader,
        network=wrap(net),
        optimizer=torch.optim.Adam(net.parameters(), lr=0.01),
        adversary=wrap(adv),
        adv_optimizer=torch.optim.Adam(adv.parameters(), lr=0.01),
        adv_weight=0.5,
        kl_weight=0.01,
        adversary_update=adversary_update,
        accumulation_steps=accumulation_steps,
        prepare_batch=PrepareBatchCluster("features"),
        decollate=False,
    )
    losses: list[list[float]] = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: losses.append([float(e.state.output[k]) for k in LOSS_KEYS])
    )
    trainer.run()
    flat = [torch.cat([p.detach().flatten() for p in m.parameters()]) for m in (net, adv)]
    return {"losses": torch.tensor(losses), "network": flat[0], "adversary": flat[1], "sampler_epoch": sampler.epoch}


def _sharded_regression_mse(rank: int) -> float:
    """The validation MSE of a zero prediction on the labels [1, 3, 1, 3], which a DistributedSampler splits into
    [1, 1] for rank 0 and [3, 3] for rank 1: 5.0 over the whole set on every rank."""
    net = MixedEffectsMLP(2, 1, n_clusters=N_CLUSTERS)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
    items = [{"features": torch.zeros(2), "label": torch.tensor(1.0 + 2 * (i % 2)), "cluster": torch.tensor(i % 2)}
             for i in range(4)]  # fmt: skip
    sampler = DistributedSampler(items, num_replicas=WORLD_SIZE, rank=rank, shuffle=False)
    loader = DataLoader(items, batch_size=2, sampler=sampler)
    evaluator = ARMEDEvaluator("cpu", loader, net, prepare_batch=PrepareBatchCluster("features"), task="regression")
    evaluator.run()
    return float(evaluator.state.metrics["mse"])


def _random_states_round_trip(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each rank draws its own stream (seed 100 + rank); only rank 0 saves the checkpoint, every rank loads it. Returns
    what the rank drew after the save and what it draws again after loading: equal when its own state came back."""
    torch.manual_seed(100 + rank)
    states = RandomStates()
    engine = Engine(lambda e, b: torch.rand(1))
    states.attach(engine)  # the ranks exchange their states at the epoch's end
    engine.run([0, 1], max_epochs=1)
    checkpoint = [states.state_dict() if rank == 0 else None]
    drawn = torch.rand(4)
    dist.broadcast_object_list(checkpoint, src=0)
    states.load_state_dict(checkpoint[0])
    again = torch.rand(4)
    # a checkpoint of one process (or of monai-armed 0.7) holds one state: the ranks must not draw alike after it
    states.load_state_dict(checkpoint[0]["ranks"][0])
    return drawn, again, torch.rand(4)


def _sharded_handlers(rank: int, out_dir: str) -> dict:
    """The evaluation handlers on a validation set that a ``DistributedSampler`` splits between the ranks: each table,
    report and CSV covers both shards, and one process writes each file (found by helper 51: each rank wrote its own
    shard's, the last writer winning)."""
    torch.manual_seed(0)
    net = MixedEffectsMLP(2, 1, n_clusters=N_CLUSTERS).eval()
    out = Path(out_dir)

    def evaluate(n_items: int, gather: bool, even: bool = True) -> tuple[int, int, list[str]]:
        x, y, c = _problem(n_items, seed=5)
        items = [{"features": x[i], "label": y[i].long(), "cluster": c[i]} for i in range(n_items)]
        sampler = (DistributedSampler(items, WORLD_SIZE, rank, shuffle=False) if even
                   else MonaiDistributedSampler(items, False, WORLD_SIZE, rank, shuffle=False))  # fmt: skip
        loader = DataLoader(items, batch_size=2, sampler=sampler)
        evaluator = ARMEDEvaluator("cpu", loader, net, prepare_batch=PrepareBatchCluster("features"), decollate=False)
        # each rank names its own file: only rank 0's may exist
        PerClusterAccuracy(N_CLUSTERS, output_file=out / f"per_cluster_{n_items}_{gather}_rank{rank}.json",
                           gather_processes=gather).attach(evaluator)  # fmt: skip
        report = ClusterModeReport(evaluator, {"seen": loader}, {"seen": ["fixed"]}, gather_processes=gather,
                                   output_file=out / f"report_rank{rank}.json")  # fmt: skip
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            evaluator.run()
            report_n = report.run()["seen"]["fixed"]["n"]
        table = evaluator.state.metric_details["per_cluster_accuracy"]
        shards = sorted({str(w.message) for w in caught if "shard" in str(w.message)})  # not sklearn's own warnings
        return sum(row["n"] for row in table.values()), report_n, shards

    results = {"gathered": evaluate(8, True), "own_shard": evaluate(8, False), "padded": evaluate(7, True),
               "uneven": evaluate(7, True, even=False)}  # fmt: skip
    trainer = Engine(lambda engine, batch: {"loss": torch.tensor(float(rank + 1))})
    LossHistory(out / f"loss_history_rank{rank}.json", average_processes=False).attach(trainer)
    trainer.run([0, 1], max_epochs=1)
    images = [{"image": torch.zeros(1, 8, 8), "image_path": f"img{i}.tif"} for i in range(8)]
    image_loader = DataLoader(images, batch_size=2, sampler=DistributedSampler(images, WORLD_SIZE, rank, shuffle=False))
    segmenter = Engine(lambda engine, batch: {"pred": torch.randn(len(batch["image"]), 2, 8, 8)})
    writer = SegmentationWriter(out / "segmentation", gather_processes=True)
    writer.attach(segmenter)
    writer.attach(segmenter)  # once only: a second attach claimed every name twice and refused the run
    segmenter.run(image_loader, max_epochs=1)
    return results


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool (and the ranks share 2 cores)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        results = {config: _train(WORLD_SIZE, rank, *config) for config in CONFIGS}
        results["regression_mse"] = _sharded_regression_mse(rank)
        results["random_states"] = _random_states_round_trip(rank)
        results["handlers"] = _sharded_handlers(rank, out_dir)
    finally:
        dist.destroy_process_group()
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TestDDPMatchesSingleProcess(unittest.TestCase):
    """Two gloo processes on CPU train with ``armed_ddp`` and match one process on the union of their batches.

    A ``DistributedSampler`` (shuffled, seed 0) gives rank ``r`` the samples ``perm[r::2]``, so the two ranks' batch
    ``k`` together hold exactly batch ``k`` of a single-replica sampler with the same seed and twice the batch size;
    MONAI's ``Workflow`` calls ``set_epoch`` on both at every epoch start, so the permutations agree every epoch. Each
    loss is a mean over equally sized shards and DDP averages the gradients, so the updates equal the single-process
    updates. The random effects sample in training mode; with ``sample_per_row=False`` a forward pass draws one
    ``(clusters, units)`` noise tensor whose values depend only on the generator state, which seed 0 makes identical
    in every process and in the single-process run (a per-row draw could not be split between ranks identically).
    What remains is float round-off: the per-iteration losses, averaged over the ranks, must match within 1e-5.
    """

    @classmethod
    def setUpClass(cls) -> None:
        cls.single = {config: _train(1, 0, *config) for config in CONFIGS}
        with tempfile.TemporaryDirectory() as out_dir:
            # fork: the workers inherit the imported modules instead of importing torch, MONAI and sklearn again
            mp.start_processes(_worker, args=(_free_port(), out_dir), nprocs=WORLD_SIZE, join=True, start_method="fork")
            cls.ranks = [torch.load(Path(out_dir) / f"rank{r}.pt") for r in range(WORLD_SIZE)]
            out = Path(out_dir)
            cls.files = {
                "written": sorted(p.name for p in out.glob("*.json")),
                "per_cluster": json.loads((out / "per_cluster_8_True_rank0.json").read_text()),
                "report": json.loads((out / "report_rank0.json").read_text()),
                "loss_history": json.loads((out / "loss_history_rank0.json").read_text()),
                "segmentation_rows": list(csv.DictReader((out / "segmentation" / "segmentation.csv").open())),
                "segmentation_tiffs": sorted(p.name for p in (out / "segmentation").glob("*.tif")),
            }

    def test_evaluation_handlers_gather_every_shard_when_asked_and_rank_0_writes(self):
        for rank in self.ranks:
            table_n, report_n, warned = rank["handlers"]["gathered"]
            self.assertEqual((table_n, report_n, warned), (8, 8, []))
            # by default each process keeps its own shard (a handler on rank 0 alone must not wait for the others)
            table_n, report_n, warned = rank["handlers"]["own_shard"]
            self.assertEqual((table_n, report_n), (4, 4))
            self.assertTrue(warned and all("shard alone; pass gather_processes=True" in w for w in warned), warned)
            # torch's sampler evens 7 items into 2 x 4 by repeating one, which the gathered table counts twice
            table_n, _, warned = rank["handlers"]["padded"]
            self.assertEqual(table_n, 8)
            self.assertTrue(any("repeats 1 item(s), which are counted twice" in w for w in warned), warned)
            # as the warning advises, MONAI's sampler without even_divisible gives every item once
            self.assertEqual(rank["handlers"]["uneven"], (7, 7, []))
        self.assertFalse([name for name in self.files["written"] if "rank1" in name], "rank 1 wrote a file")
        self.assertEqual(sum(row["n"] for row in self.files["per_cluster"].values()), 8)
        self.assertEqual(self.files["report"]["seen"]["fixed"]["n"], 7)  # the last report: 7 items, MONAI's sampler
        self.assertEqual(self.files["loss_history"]["loss"], [1.0], "rank 0's own losses (average_processes=False)")
        self.assertEqual(sorted(row["image"] for row in self.files["segmentation_rows"]), [f"img{i}.tif" for i in range(8)])
        self.assertEqual(self.files["segmentation_tiffs"], [f"img{i}_seg.tif" for i in range(8)])

    def test_rank0s_checkpoint_restores_every_ranks_own_random_stream(self):
        (drawn0, again0, single0), (drawn1, again1, single1) = (rank["random_states"] for rank in self.ranks)
        self.assertTrue(torch.equal(drawn0, again0) and torch.equal(drawn1, again1))
        self.assertFalse(torch.equal(drawn0, drawn1), "the ranks drew the same stream")
        # from a one-process state rank 0 continues it and rank 1 re-seeds from it and its rank
        self.assertTrue(torch.equal(single0, drawn0))
        self.assertFalse(torch.equal(single1, single0) or torch.equal(single1, drawn1))

    def test_regression_metrics_cover_every_ranks_shard(self):
        self.assertEqual([rank["regression_mse"] for rank in self.ranks], [5.0, 5.0])

    def test_loss_curves_match(self):
        for config in CONFIGS:
            single = self.single[config]["losses"]
            self.assertEqual(tuple(single.shape), (EPOCHS * N_SAMPLES // GLOBAL_BATCH, len(LOSS_KEYS)))
            ddp = torch.stack([r[config]["losses"] for r in self.ranks]).mean(0)
            torch.testing.assert_close(ddp, single, rtol=0, atol=1e-5, msg=lambda m: f"{config}: {m}")
            # the shards differ, so the local losses do too: the match is not that of two identical copies
            self.assertGreater(
                float((self.ranks[0][config]["losses"] - self.ranks[1][config]["losses"]).abs().max()), 1e-3
            )
            # the curve moved: a run that never updated the parameters would not match a trained one
            self.assertGreater(float((single[-1, 1:3] - single[0, 1:3]).abs().max()), 1e-2)

    def test_parameters_identical_across_ranks_and_close_to_single_process(self):
        for config in CONFIGS:
            for key in ("network", "adversary"):
                self.assertTrue(torch.equal(self.ranks[0][config][key], self.ranks[1][config][key]), (config, key))
                torch.testing.assert_close(self.ranks[0][config][key], self.single[config][key], rtol=0, atol=1e-5)

    def test_workflow_sets_sampler_epoch(self):
        for rank in self.ranks:
            for config in CONFIGS:
                self.assertEqual(rank[config]["sampler_epoch"], EPOCHS)


class TestWrapperChecks(unittest.TestCase):
    """Wrapper rules, checked in a one-process gloo group (DDP needs an initialised process group)."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.tmp = tempfile.TemporaryDirectory()
        dist.init_process_group("gloo", init_method=f"file://{cls.tmp.name}/store", rank=0, world_size=1)

    @classmethod
    def tearDownClass(cls) -> None:
        dist.destroy_process_group()
        cls.tmp.cleanup()

    def _trainer(self, network, adversary) -> ARMEDTrainer:
        net = unwrap_armed(network)
        return ARMEDTrainer(
            device="cpu",
            max_epochs=1,
            train_data_loader=[],
            network=network,
            optimizer=torch.optim.Adam(net.parameters()),
            adversary=adversary,
        )

    def test_armed_ddp_wraps_network_through_adapter(self):
        net, adv = _models()
        ddp_net, ddp_adv = armed_ddp(net), armed_ddp(adv)
        self.assertIsInstance(ddp_net.module, ARMEDForward)
        self.assertIs(ddp_adv.module, adv)
        self.assertIs(unwrap_armed(ddp_net), net)
        self.assertIs(unwrap_armed(ddp_adv), adv)
        self.assertIs(unwrap_armed(net), net)
        self.assertIsNone(armed_ddp(None))
        x, c = torch.randn(6, 2), torch.tensor([0, 1, 2, 3, -1, 0])
        net.eval()  # posterior means: the two calls are comparable
        expected, got = net.forward_armed(x, c), ddp_net(x, c)
        for a, b in zip(
            (expected.pred, expected.pred_fe, expected.kl, *expected.features),
            (got.pred, got.pred_fe, got.kl, *got.features),
        ):
            torch.testing.assert_close(a, b)
        trainer = self._trainer(ddp_net, ddp_adv)
        self.assertIs(trainer.players["adversary"].unwrapped, adv, "the frozen main-step call bypasses DDP")
        self.assertIs(trainer.adversary, ddp_adv)

    def test_plain_ddp_network_is_refused(self):
        net, adv = _models()
        with self.assertRaisesRegex(TypeError, r"DistributedDataParallel\(network\) would bypass.*armed_ddp"):
            self._trainer(DistributedDataParallel(net), armed_ddp(adv))

    def test_mixed_wrappers_are_refused(self):
        net, adv = _models()
        with self.assertRaisesRegex(
            ValueError, "both plain or both DistributedDataParallel.*adversary=ClusterAdversary"
        ):
            self._trainer(armed_ddp(net), adv)
        with self.assertRaisesRegex(ValueError, "network=MixedEffectsMLP, adversary=DistributedDataParallel"):
            self._trainer(net, armed_ddp(adv))

    def test_bad_modules_for_wrappers(self):
        net, _ = _models()
        with self.assertRaisesRegex(TypeError, "armed_ddp wraps the plain module, got a DistributedDataParallel"):
            armed_ddp(armed_ddp(net))
        with self.assertRaisesRegex(TypeError, "ARMEDForward needs a network with forward_armed.*Linear"):
            ARMEDForward(torch.nn.Linear(2, 1))
        with self.assertRaisesRegex(TypeError, "does not support DataParallel"):
            self._trainer(net, torch.nn.DataParallel(ClusterAdversary(12, 4)))


if __name__ == "__main__":
    unittest.main()
