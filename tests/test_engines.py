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

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from ignite.engine import Events
from monai.data import DataLoader, Dataset
from monai.networks.nets import DenseNet121
from parameterized import parameterized

from monai_armed.data import TensorBatchLoader
from monai_armed.engines import ARMEDEvaluator, ARMEDKeys, ARMEDTrainer, PrepareBatchCluster
from monai_armed.losses import LogitClassificationLoss, balanced_class_weights, cluster_confusion_loss
from monai_armed.networks import ARMED, ClusterAdversary, MixedEffectsMLP, ZPredictor
from monai_armed.transforms import ClusterIndexd, ClusterVocabulary

N_CLUSTERS = 4
LOSS_KEYS = ("loss", "loss_me", "loss_fe", "loss_adv", "loss_gen", "loss_kl", "adv_accuracy")


def _problem(n: int = 256, seed: int = 0, shift: float = 2.0):
    """4 clusters, 2 features; each cluster shifts the inputs (readable from features) and offsets the label."""
    g = torch.Generator().manual_seed(seed)
    cluster = torch.arange(n) % N_CLUSTERS
    offsets = torch.tensor([-1.0, -0.3, 0.3, 1.0])
    shifts = shift * torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    base = torch.randn(n, 2, generator=g)
    x = base + shifts[cluster]
    y = ((base[:, 0] + base[:, 1] + offsets[cluster]) > 0).float()
    return x, y, cluster


def _loader(n: int = 256, batch_size: int = 32, shuffle: bool = True, seed: int = 0, **kwargs):
    x, y, c = _problem(n, seed=seed, **kwargs)
    data = {"features": x, "label": y, "cluster": c}
    return TensorBatchLoader(data, batch_size=batch_size, shuffle=shuffle, seed=seed)


def _models(seed: int = 0, variant: str = "armed"):
    torch.manual_seed(seed)
    net = MixedEffectsMLP.from_variant(variant, in_features=2, out_channels=1, n_clusters=N_CLUSTERS)
    adv = ClusterAdversary(net.feature_channels, n_clusters=N_CLUSTERS, hidden_channels=(8, 8))
    return net, adv


def _trainer(loader, net, adv, epochs: int = 3, lr: float = 0.01, adv_lr: float = 0.01, sgd: bool = False, **kwargs):
    opt = torch.optim.SGD if sgd else torch.optim.Adam
    return ARMEDTrainer(
        device="cpu",
        max_epochs=epochs,
        train_data_loader=loader,
        network=net,
        optimizer=opt(net.parameters(), lr=lr),
        adversary=adv,
        adv_optimizer=opt(adv.parameters(), lr=adv_lr) if adv is not None else None,
        prepare_batch=PrepareBatchCluster("features"),
        decollate=False,
        **kwargs,
    )


def _flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


def _grads(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.detach().flatten().clone() for p in module.parameters()])


def _adv_ce(net: MixedEffectsMLP, adv: ClusterAdversary, x: torch.Tensor, c: torch.Tensor) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(adv(net.forward_armed(x, c).features), c))


class TestARMEDTrainer(unittest.TestCase):
    def test_loss_parts_and_total(self):
        net, adv = _models()
        trainer = _trainer(_loader(), net, adv, epochs=3, me_weight=1.0, fe_weight=0.5, adv_weight=0.3, kl_weight=0.01)
        epoch_me: list[list[float]] = []
        trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: epoch_me.append([]))
        trainer.add_event_handler(
            Events.ITERATION_COMPLETED, lambda e: epoch_me[-1].append(float(e.state.output["loss_me"]))
        )
        before_net, before_adv = _flat(net), _flat(adv)
        trainer.run()
        out = trainer.state.output
        for key in LOSS_KEYS:
            self.assertIn(key, out)
            self.assertEqual(out[key].dim(), 0, key)
            self.assertFalse(out[key].requires_grad, key)
        self.assertEqual(tuple(out["pred"].shape), (32, 1))
        self.assertEqual(tuple(out[ARMEDKeys.PRED_FE].shape), (32, 1))
        self.assertGreater(float(out["loss_kl"]), 0.0)
        self.assertTrue(0.0 <= float(out["adv_accuracy"]) <= 1.0)
        expected = out["loss_me"] + 0.5 * out["loss_fe"] - 0.3 * out["loss_gen"] + 0.01 * out["loss_kl"] / trainer.n_train
        self.assertEqual(trainer.n_train, 256)  # the ELBO scales the KL by the rows of the loader
        torch.testing.assert_close(out["loss"], expected)
        # training reduces the mixed-effects loss
        self.assertEqual(len(epoch_me), 3)
        self.assertLess(np.mean(epoch_me[-1]), np.mean(epoch_me[0]))
        # both the adversary and the network were trained
        self.assertFalse(torch.equal(before_net, _flat(net)))
        self.assertFalse(torch.equal(before_adv, _flat(adv)))

    def test_main_optimizer_does_not_touch_adversary(self):
        net, adv = _models()
        before_net, before_adv = _flat(net), _flat(adv)
        trainer = _trainer(_loader(), net, adv, epochs=2, adv_lr=0.0, adv_weight=1.0)
        trainer.run()
        self.assertTrue(torch.equal(before_adv, _flat(adv)))
        self.assertFalse(torch.equal(before_net, _flat(net)))

    def test_adversary_gradient_is_its_own_loss_only(self):
        """Sequential mode: after an iteration the adversary's gradient is that of CE(adversary(detached features))
        alone, i.e. the main step's -adv_weight * loss_gen does not leak into the adversary."""
        net, adv = _models()
        loader = _loader(n=64, batch_size=64, shuffle=False)
        trainer = _trainer(loader, net, adv, epochs=1, lr=0.0, adv_lr=0.0, sgd=True, adv_weight=0.7)
        trainer.run()
        got = _grads(adv)
        batch = next(iter(loader))
        adv.zero_grad()
        feats = [f.detach() for f in net.forward_armed(batch["features"], batch["cluster"]).features]
        F.cross_entropy(adv(feats), batch["cluster"]).backward()
        torch.testing.assert_close(got, _grads(adv))
        self.assertTrue(all(p.requires_grad for p in adv.parameters()))  # unfrozen after the main step

    @parameterized.expand([("sequential",), ("simultaneous",)])
    def test_network_gradient_matches_objective(self, mode):
        """With deterministic fixed-effects only (domain-adversarial variant) and lr=0 the network gradient equals the
        gradient of me*BCE(pred) + fe*BCE(pred_fe) - adv*CE(adversary(features)) computed by hand."""
        net, adv = _models(variant="domain_adversarial")
        loader = _loader(n=64, batch_size=64, shuffle=False)
        kw = {"me_weight": 1.0, "fe_weight": 0.5, "adv_weight": 0.8, "kl_weight": 0.1, "adversary_update": mode}
        trainer = _trainer(loader, net, adv, epochs=1, lr=0.0, adv_lr=0.0, sgd=True, **kw)
        trainer.run()
        got_net, got_adv = _grads(net), _grads(adv)
        batch = next(iter(loader))
        x, y, c = batch["features"], batch["label"], batch["cluster"]
        net.zero_grad()
        adv.zero_grad()
        out = net.forward_armed(x, c)
        ce = F.cross_entropy(adv(out.features), c)
        loss = (
            F.binary_cross_entropy_with_logits(out.pred[:, 0], y)
            + 0.5 * F.binary_cross_entropy_with_logits(out.pred_fe[:, 0], y)
            - 0.8 * ce
        )
        loss.backward()
        torch.testing.assert_close(got_net, _grads(net))
        adv.zero_grad()
        F.cross_entropy(adv([f.detach() for f in out.features]), c).backward()
        torch.testing.assert_close(got_adv, _grads(adv))

    def test_generator_step_increases_adversary_loss(self):
        net, adv = _models()
        loader = _loader(n=128, batch_size=128, shuffle=False)
        batch = next(iter(loader))
        x, c = batch["features"], batch["cluster"]
        before = _adv_ce(net, adv, x, c)
        trainer = _trainer(
            loader, net, adv, epochs=1, lr=0.05, adv_lr=0.0, sgd=True, me_weight=0.0, fe_weight=0.0, kl_weight=0.0
        )
        trainer.run()
        after = _adv_ce(net, adv, x, c)
        self.assertGreater(after, before)
        self.assertNotIn("loss_me", trainer.state.output)
        torch.testing.assert_close(trainer.state.output["loss"], -trainer.state.output["loss_gen"])

    def test_adversarial_weight_hides_cluster(self):
        """After an adversary has learnt to read the cluster (network frozen), training the network with a large
        adv_weight against that (now frozen) adversary lowers its accuracy far more than training with adv_weight=0."""
        x, _, c = _problem(256, seed=3, shift=3.0)

        def accuracy(net, adv):
            with torch.no_grad():
                return float((adv(net.forward_armed(x, c).features).argmax(1) == c).float().mean())

        net, adv = _models(seed=3)
        loader = _loader(shift=3.0, seed=3, batch_size=64)
        _trainer(loader, net, adv, epochs=6, lr=0.0, adv_lr=0.05, adv_weight=0.0).run()
        before = accuracy(net, adv)
        self.assertGreater(before, 0.7)  # the adversary does read the cluster
        after = {}
        for weight in (0.0, 2.0):
            torch.manual_seed(0)
            net_w, adv_w = copy.deepcopy(net), copy.deepcopy(adv)
            _trainer(
                _loader(shift=3.0, seed=3, batch_size=64),
                net_w,
                adv_w,
                epochs=4,
                lr=0.02,
                adv_lr=0.0,
                adv_weight=weight,
            ).run()
            self.assertTrue(torch.equal(_flat(adv_w), _flat(adv)))
            after[weight] = accuracy(net_w, adv_w)
        self.assertLess(after[2.0], before - 0.2)
        self.assertLess(after[2.0], after[0.0] - 0.2)

    def test_confusion_objective_gradient(self):
        """adversarial_objective='confusion': the network gradient is that of the task losses plus adv_weight times
        the frozen adversary's cross-entropy against the uniform distribution; the adversary's own step is unchanged."""
        net, adv = _models(variant="domain_adversarial")
        loader = _loader(n=64, batch_size=64, shuffle=False)
        kw = {"me_weight": 1.0, "fe_weight": 0.5, "adv_weight": 0.8, "kl_weight": 0.0}
        trainer = _trainer(
            loader, net, adv, epochs=1, lr=0.0, adv_lr=0.0, sgd=True, adversarial_objective="confusion", **kw
        )
        trainer.run()
        got_net, got_adv = _grads(net), _grads(adv)
        batch = next(iter(loader))
        x, y, c = batch["features"], batch["label"], batch["cluster"]
        net.zero_grad()
        out = net.forward_armed(x, c)
        uniform_ce = -torch.log_softmax(adv(out.features), dim=1).mean()
        loss = (
            F.binary_cross_entropy_with_logits(out.pred[:, 0], y)
            + 0.5 * F.binary_cross_entropy_with_logits(out.pred_fe[:, 0], y)
            + 0.8 * uniform_ce
        )
        loss.backward()
        torch.testing.assert_close(got_net, _grads(net))
        adv.zero_grad()
        F.cross_entropy(adv([f.detach() for f in out.features]), c).backward()
        torch.testing.assert_close(got_adv, _grads(adv))
        output = trainer.state.output
        torch.testing.assert_close(output["loss_gen"], uniform_ce.detach())
        torch.testing.assert_close(
            output["loss"], output["loss_me"] + 0.5 * output["loss_fe"] + 0.8 * output["loss_gen"]
        )

    def test_confusion_step_flattens_adversary(self):
        """A main step with only the confusion term moves the frozen adversary's predictions towards uniform."""
        net, adv = _models()
        loader = _loader(n=128, batch_size=128, shuffle=False, shift=3.0)
        batch = next(iter(loader))
        x, c = batch["features"], batch["cluster"]
        _trainer(loader, net, adv, epochs=5, lr=0.0, adv_lr=0.05, adv_weight=0.0).run()  # the adversary learns

        def uniform_ce() -> float:
            with torch.no_grad():
                return float(cluster_confusion_loss(adv(net.forward_armed(x, c).features), c))

        before = uniform_ce()
        _trainer(
            loader, net, adv, epochs=3, lr=0.05, adv_lr=0.0, sgd=True, me_weight=0.0, fe_weight=0.0, kl_weight=0.0,
            adversarial_objective="confusion",
        ).run()  # fmt: skip
        self.assertLess(uniform_ce(), before)

    def test_confusion_loss_values(self):
        logits = torch.zeros(3, 5, requires_grad=True)
        torch.testing.assert_close(
            cluster_confusion_loss(logits, torch.tensor([0, 1, 2])), torch.tensor(np.log(5.0), dtype=torch.float32)
        )
        skewed = torch.tensor([[4.0, 0.0], [0.0, 0.0]])
        torch.testing.assert_close(
            cluster_confusion_loss(skewed, torch.tensor([-1, 1])), torch.tensor(np.log(2.0)), check_dtype=False
        )
        none_seen = cluster_confusion_loss(logits, torch.tensor([-1, -1, -1]))
        self.assertEqual(float(none_seen), 0.0)
        none_seen.backward()  # still differentiable
        with self.assertRaisesRegex(ValueError, "expects logits"):
            cluster_confusion_loss(torch.zeros(3), torch.tensor([0, 1, 2]))

    def test_adversary_steps(self):
        """adversary_steps=k takes k adversary updates per iteration on the same detached features: with plain SGD
        the adversary ends where k successive single steps on that batch would take it, the network is unaffected."""
        loader = _loader(n=64, batch_size=64, shuffle=False)
        batch = next(iter(loader))
        net, adv = _models(variant="domain_adversarial")
        reference = copy.deepcopy(adv)
        _trainer(loader, net, adv, epochs=1, lr=0.0, adv_lr=0.1, sgd=True, adversary_steps=3).run()
        optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
        features = [f.detach() for f in net.forward_armed(batch["features"], batch["cluster"]).features]
        for _ in range(3):
            optimizer.zero_grad()
            F.cross_entropy(reference(features), batch["cluster"]).backward()
            optimizer.step()
        torch.testing.assert_close(_flat(adv), _flat(reference))
        with self.assertRaisesRegex(ValueError, "adversary_steps must be >= 1"):
            _trainer(loader, net, adv, adversary_steps=0)
        with self.assertRaisesRegex(ValueError, "1 with gradient accumulation"):
            _trainer(loader, net, adv, adversary_steps=2, accumulation_steps=2)

    def test_rejects_bad_adversarial_objective(self):
        net, adv = _models()
        with self.assertRaisesRegex(ValueError, "adversarial_objective must be"):
            _trainer(_loader(), net, adv, adversarial_objective="entropy")
        with self.assertRaisesRegex(ValueError, "needs adversary_update='sequential'"):
            _trainer(_loader(), net, adv, adversarial_objective="confusion", adversary_update="simultaneous")

    def test_simultaneous_mode(self):
        net, adv = _models()
        before_net, before_adv = _flat(net), _flat(adv)
        trainer = _trainer(_loader(), net, adv, epochs=2, adversary_update="simultaneous")
        trainer.run()
        for key in LOSS_KEYS:
            self.assertIn(key, trainer.state.output)
        self.assertFalse(torch.equal(before_adv, _flat(adv)))
        self.assertFalse(torch.equal(before_net, _flat(net)))
        torch.testing.assert_close(trainer.state.output["loss_adv"], trainer.state.output["loss_gen"])

    def test_no_adversary(self):
        net, _ = _models()
        trainer = _trainer(_loader(), net, None, epochs=1)
        trainer.run()
        self.assertNotIn("loss_gen", trainer.state.output)
        self.assertNotIn("adv_accuracy", trainer.state.output)

    def test_gradient_accumulation(self):
        net, adv = _models()
        trainer = _trainer(_loader(n=224), net, adv, epochs=2, accumulation_steps=2)  # 7 iterations per epoch
        steps = {"net": 0, "adv": 0}
        trainer.optimizer.register_step_post_hook(lambda *a: steps.__setitem__("net", steps["net"] + 1))
        trainer.adv_optimizer.register_step_post_hook(lambda *a: steps.__setitem__("adv", steps["adv"] + 1))
        trainer.run()
        self.assertEqual(trainer.state.iteration, 14)
        self.assertEqual(steps, {"net": 8, "adv": 8})  # 3 full pairs + 1 flush per epoch
        self.assertTrue(torch.isfinite(trainer.state.output["loss"]))

    def test_rejects_plain_network(self):
        with self.assertRaisesRegex(TypeError, "forward_armed"):
            _trainer(_loader(), nn.Linear(2, 1), None)

    def test_rejects_bad_adversary_update(self):
        net, adv = _models()
        with self.assertRaisesRegex(ValueError, "adversary_update"):
            _trainer(_loader(), net, adv, adversary_update="alternating")

    def test_default_adversary_optimizer(self):
        net, adv = _models()
        trainer = ARMEDTrainer(
            device="cpu",
            max_epochs=1,
            train_data_loader=_loader(),
            network=net,
            optimizer=torch.optim.Adam(net.parameters()),
            adversary=adv,
            prepare_batch=PrepareBatchCluster("features"),
        )
        self.assertIsInstance(trainer.adv_optimizer, torch.optim.Adam)
        self.assertIs(trainer.adv_optimizer.param_groups[0]["params"][0], next(adv.parameters()))


class TestELBO(unittest.TestCase):
    def test_training_rows_come_from_the_loader_or_must_be_given(self):
        net, adv = _models()
        x, y, c = torch.randn(24, 2), torch.randint(0, 2, (24,)), torch.randint(0, 4, (24,))
        items = [{"features": x[i], "label": y[i], "cluster": c[i]} for i in range(24)]
        monai_loader = DataLoader(Dataset(items), batch_size=8)
        self.assertEqual(_trainer(monai_loader, net, adv).n_train, 24)
        batches = [{"features": x[:8], "label": y[:8], "cluster": c[:8]}]
        trainer = _trainer(batches, net, adv, epochs=1)
        with self.assertRaisesRegex(ValueError, "pass n_train=N"):
            trainer.run()
        self.assertEqual(_trainer(batches, net, adv, n_train=100).n_train, 100)
        _trainer(batches, net, adv, epochs=1, kl_weight=0.0).run()  # no KL term: no need to know N
        with self.assertRaisesRegex(ValueError, "n_train must be"):
            _trainer(batches, net, adv, n_train=0)

    def test_a_gaussian_family_trains_its_residual_scale_and_reads_weights(self):
        from monai_armed.losses import GaussianLikelihood

        torch.manual_seed(0)
        x, c = torch.randn(64, 2), torch.randint(0, 4, (64,))
        y = 3 * x[:, :1] + 0.5 * torch.randn(64, 1)
        weight = torch.ones(64)
        net = MixedEffectsMLP(2, 1, n_clusters=4, hidden_channels=(), random_slopes="none")
        family = GaussianLikelihood(scale_init=3.0)
        optimizer = torch.optim.Adam(net.parameters(), 0.05)
        loader = TensorBatchLoader({"features": x, "label": y, "cluster": c, "w": weight}, batch_size=16)
        trainer = ARMEDTrainer("cpu", 30, loader, net, optimizer, loss_function=family, fe_weight=0.0,
                               prepare_batch=PrepareBatchCluster("features"), weight_key="w", decollate=False)
        self.assertTrue(any(p is family.log_scale for p in optimizer.param_groups[0]["params"]))  # added to it
        trainer.run()
        self.assertLess(float(family.scale), 1.0)  # from 3 towards the residual s.d. 0.5
        zero = ARMEDTrainer("cpu", 1, TensorBatchLoader({"features": x, "label": y, "cluster": c, "w": weight * 0},
                                                        batch_size=16),
                            net, optimizer, loss_function=family, fe_weight=0.0, kl_weight=0.0,
                            prepare_batch=PrepareBatchCluster("features"), weight_key="w", decollate=False)
        zero.run()
        self.assertEqual(float(zero.state.output[0]["loss"]), 0.0)  # weights multiply every row's likelihood


class TestFamilyBatchChecks(unittest.TestCase):
    """A run's first batch is checked against the likelihood family: values it cannot take fail there, naming the
    batch key and row, instead of training to a NaN or unbounded loss."""

    def _trainer(self, label: torch.Tensor, family, weight: torch.Tensor | None = None, **kwargs) -> ARMEDTrainer:
        torch.manual_seed(0)
        x, c = torch.randn(16, 2), torch.randint(0, 4, (16,))
        data = {"features": x, "label": label, "cluster": c, **({"w": weight} if weight is not None else {})}
        net = MixedEffectsMLP(2, 1, n_clusters=4, hidden_channels=(), random_slopes="none")
        return ARMEDTrainer("cpu", 1, TensorBatchLoader(data, batch_size=8), net, torch.optim.Adam(net.parameters()),
                            loss_function=family, prepare_batch=PrepareBatchCluster("features"), decollate=False,
                            weight_key="w" if weight is not None else None, **kwargs)  # fmt: skip

    def test_values_the_family_cannot_take_fail_on_the_first_batch(self):
        from monai_armed.losses import likelihood

        nan = torch.zeros(16)
        nan[3] = float("nan")
        counts = torch.full((16,), 2.0)
        counts[5] = -2.0
        binary = torch.zeros(16)
        binary[1] = 2.0
        for label, family, message in (
            (nan, likelihood("gaussian"), "column 'label' row 3 has nan"),
            (counts, likelihood("poisson"), "column 'label' row 5 has -2"),
            (binary, likelihood("bernoulli"), "column 'label' row 1 has 2"),
        ):
            with self.assertRaisesRegex(ValueError, "a training batch's values .*" + message):
                self._trainer(label, family).run()
        weight = torch.ones(16)
        weight[2] = -1.0
        with self.assertRaisesRegex(ValueError, "column 'w' row 2 has -1.0; row weights must be finite and >= 0"):
            self._trainer(torch.zeros(16), likelihood("gaussian"), weight).run()
        self._trainer(torch.zeros(16), likelihood("gaussian"), torch.zeros(16)).run()  # zero weights: masked rows

    def test_a_summed_likelihood_is_refused_and_a_scheduler_drives_the_loss_parameters_too(self):
        from monai_armed.losses import likelihood

        with self.assertRaisesRegex(ValueError, r"reduction='sum'\) makes the data term batch_size times too heavy"):
            self._trainer(torch.zeros(16), likelihood("gaussian", reduction="sum"))
        self._trainer(torch.zeros(16), likelihood("gaussian", reduction="sum"), kl_weight=0.0)  # no KL: a choice
        torch.manual_seed(0)
        net = MixedEffectsMLP(2, 1, n_clusters=4, hidden_channels=(), random_slopes="none")
        optimizer = torch.optim.Adam(net.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.5**epoch)  # one lambda per group
        data = {"features": torch.randn(16, 2), "label": torch.zeros(16), "cluster": torch.randint(0, 4, (16,))}
        family = likelihood("gaussian")
        trainer = ARMEDTrainer("cpu", 2, TensorBatchLoader(data, batch_size=8), net, optimizer, loss_function=family,
                               prepare_batch=PrepareBatchCluster("features"), decollate=False)  # fmt: skip
        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: scheduler.step())
        before = float(family.log_scale)
        trainer.run()  # LambdaLR failed after epoch 1 when the scale was a group of its own
        self.assertEqual(len(optimizer.param_groups), 1)
        self.assertTrue(any(p is family.log_scale for p in optimizer.param_groups[0]["params"]))
        self.assertNotEqual(float(family.log_scale), before)
        self.assertAlmostEqual(optimizer.param_groups[0]["lr"], 0.1 * 0.25)
        # several groups (e.g. a frozen one): a new group with the optimizer's defaults, or refused under a scheduler
        frozen, rest = list(net.random_effects.parameters()), [p for n, p in net.named_parameters() if "random" not in n]
        family = likelihood("gaussian")
        grouped = torch.optim.Adam([{"params": frozen, "lr": 0.0}, {"params": rest}], lr=0.1)
        ARMEDTrainer("cpu", 1, TensorBatchLoader(data, batch_size=8), net, grouped, loss_function=family,
                     prepare_batch=PrepareBatchCluster("features"), decollate=False).run()  # fmt: skip
        self.assertEqual(len(grouped.param_groups), 3)
        self.assertEqual(grouped.param_groups[2]["lr"], 0.1)
        self.assertNotEqual(float(family.log_scale), 0.0)  # trained, not frozen with the first group
        grouped = torch.optim.Adam([{"params": frozen, "lr": 0.0}, {"params": rest}], lr=0.1)
        torch.optim.lr_scheduler.LambdaLR(grouped, [lambda epoch: 1.0, lambda epoch: 0.5**epoch])
        with self.assertRaisesRegex(ValueError, "scheduler already drives the optimizer's several parameter groups"):
            ARMEDTrainer("cpu", 1, TensorBatchLoader(data, batch_size=8), net, grouped, loss_function=likelihood("gaussian"),
                         prepare_batch=PrepareBatchCluster("features"), decollate=False)  # fmt: skip

    def test_batch_keys_for_the_loss_need_a_likelihood_family(self):
        with self.assertRaisesRegex(ValueError, "weight_key need a likelihood-family loss_function"):
            self._trainer(torch.zeros(16).long(), LogitClassificationLoss(), torch.ones(16))

    def test_classification_metrics_of_a_continuous_outcome_say_to_use_regression(self):
        from monai_armed.metrics import classification_summary

        with self.assertRaisesRegex(ValueError, "need class indices as labels, got non-integer values .*task='regression'"):
            classification_summary(torch.randn(4, 1), torch.tensor([31.5, 40.0, 52.2, 60.0]), torch.zeros(4).long(), 1)


class TestBatchErrors(unittest.TestCase):
    def _run(self, data: dict):
        net, adv = _models()
        loader = TensorBatchLoader(data, batch_size=8)
        _trainer(loader, net, adv, epochs=1).run()

    def test_missing_cluster(self):
        x, y, _ = _problem(16)
        with self.assertRaisesRegex(KeyError, "cluster"):
            self._run({"features": x, "label": y})

    def test_missing_input(self):
        x, y, c = _problem(16)
        with self.assertRaisesRegex(KeyError, "features"):
            self._run({"image": x, "label": y, "cluster": c})

    def test_extra_network_arguments_from_prepare_batch_are_refused(self):
        """MONAI passes prepare_batch's further args / keywords to the network; the ARMED engines call it with the
        inputs and the cluster alone, so they refuse them rather than drop them."""

        class WithTemperature(PrepareBatchCluster):
            def __call__(self, *args, **kwargs):
                inputs, targets, _, extra = super().__call__(*args, **kwargs)
                return inputs, targets, (), {**extra, "temperature": 10.0}

        x, y, c = _problem(16)
        net, adv = _models()
        loader = TensorBatchLoader({"features": x, "label": y, "cluster": c}, batch_size=8)
        trainer = ARMEDTrainer(device="cpu", max_epochs=1, train_data_loader=loader, network=net,
                               optimizer=torch.optim.Adam(net.parameters()), prepare_batch=WithTemperature("features"))
        evaluator = ARMEDEvaluator(device="cpu", val_data_loader=loader, network=net, prepare_batch=WithTemperature("features"))
        for engine in (trainer, evaluator):
            with self.assertRaisesRegex(ValueError, r"WithTemperature.*keywords \['temperature'\].*dropped"):
                engine.run()

    def test_nan_feature(self):
        x, y, c = _problem(16)
        x[3, 1] = float("nan")
        with self.assertRaisesRegex(ValueError, "NaN"):
            self._run({"features": x, "label": y, "cluster": c})

    def test_label_out_of_range(self):
        x, y, c = _problem(16)
        y[2] = 2
        with self.assertRaisesRegex(ValueError, r"expected 0\.\.1"):
            self._run({"features": x, "label": y, "cluster": c})

    def test_later_batches_are_checked_with_validate_batches(self):
        """The first batch's values are always checked; later batches only with validate_batches (no read-back)."""
        x, y, c = _problem(16)
        y[10] = 2  # in the second batch of 8
        x[12, 0] = float("nan")
        c[13] = N_CLUSTERS + 3
        data = {"features": x, "label": y, "cluster": c}
        net, adv = _models()
        trainer = _trainer(TensorBatchLoader(data, batch_size=8), net, adv, epochs=1)
        self.assertTrue(trainer.optim_set_to_none)
        with self.assertRaises(Exception):  # an out-of-range cluster still cannot index the random effects
            trainer.run()
        c[13] = 0
        net, adv = _models()
        _trainer(TensorBatchLoader(data, batch_size=8), net, adv, epochs=1).run()  # batch 2 not read back
        for bad, message in (("label", r"expected 0\.\.1"), ("features", "NaN")):
            clean = {"features": x.nan_to_num(), "label": y.clamp(max=1), "cluster": c}
            clean[bad] = data[bad]
            net, adv = _models()
            with self.assertRaisesRegex(ValueError, message):
                _trainer(TensorBatchLoader(clean, batch_size=8), net, adv, epochs=1, validate_batches=True).run()
        bad_cluster = {"features": x.nan_to_num(), "label": y.clamp(max=1), "cluster": c.clone()}
        bad_cluster["cluster"][13] = N_CLUSTERS + 3
        net, adv = _models()
        with self.assertRaisesRegex(IndexError, f"cluster index {N_CLUSTERS + 3} is out of range"):
            _trainer(TensorBatchLoader(bad_cluster, batch_size=8), net, adv, epochs=1, validate_batches=True).run()

    def test_cluster_input_reads_the_cluster_range_back_on_the_first_batch_only(self):
        """The cluster-as-input baseline's one-hot cluster follows the same rule as the random effects' lookup."""
        from unittest import mock

        import monai_armed.networks.utils as network_utils

        x, y, c = _problem(32)
        c[20] = -5  # in the third batch of 8: no unseen level, a bad index
        data = {"features": x, "label": y, "cluster": c}
        checks = mock.patch.object(network_utils, "check_cluster_index", wraps=network_utils.check_cluster_index)
        net, _ = _models(variant="cluster_input")
        with checks as check:
            _trainer(TensorBatchLoader(data, batch_size=8), net, None, epochs=1).run()
        self.assertEqual(check.call_count, 1)  # the first batch's
        net, _ = _models(variant="cluster_input")
        with self.assertRaisesRegex(IndexError, "cluster index -5 is out of range"):
            _trainer(TensorBatchLoader(data, batch_size=8), net, None, epochs=1, validate_batches=True).run()

    def test_step_events_reach_their_handlers(self):
        """Events inside an iteration are skipped only when nothing listens to them."""
        from monai.engines.utils import IterationEvents

        from monai_armed.engines import ARMEDIterationEvents

        net, adv = _models()
        trainer = _trainer(_loader(64, batch_size=16), net, adv, epochs=2)
        seen = []
        for event in (IterationEvents.FORWARD_COMPLETED, IterationEvents.LOSS_COMPLETED,
                      IterationEvents.BACKWARD_COMPLETED, ARMEDIterationEvents.ADVERSARY_COMPLETED):  # fmt: skip
            trainer.add_event_handler(event, lambda engine, event=event: seen.append((event, engine.state.iteration)))
        trainer.run()
        self.assertEqual(len(seen), 4 * 8)
        order = [e for e, i in seen if i == 3]
        self.assertEqual(order, [IterationEvents.FORWARD_COMPLETED, ARMEDIterationEvents.ADVERSARY_COMPLETED,
                                 IterationEvents.LOSS_COMPLETED, IterationEvents.BACKWARD_COMPLETED])  # fmt: skip

    def test_prepare_batch(self):
        x, y, c = _problem(8)
        prep = PrepareBatchCluster("features")
        inputs, targets, args, kwargs = prep({"features": x, "label": y, "cluster": c}, torch.device("cpu"))
        self.assertTrue(torch.equal(inputs, x))
        self.assertTrue(torch.equal(targets, y))
        self.assertEqual(args, ())
        self.assertTrue(torch.equal(kwargs["cluster"], c))
        _, targets, _, kwargs = PrepareBatchCluster("features", require_cluster=False)({"features": x})
        self.assertIsNone(targets)
        self.assertIsNone(kwargs["cluster"])
        with self.assertRaisesRegex(TypeError, "dictionary"):
            prep([x, y, c])


class TestARMEDEvaluator(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        torch.manual_seed(0)
        cls.net = MixedEffectsMLP(2, 1, n_clusters=N_CLUSTERS, random_slopes="both").eval()
        cls.zp = ZPredictor(in_features=2, n_clusters=N_CLUSTERS).eval()
        x, y, c = _problem(40)
        c = c.clone()
        c[::5] = -1
        cls.x, cls.y, cls.c = x, y, c
        cls.unseen = c < 0

    def _evaluate(self, mode: str, z_predictor=None, data: dict | None = None, **kwargs):
        data = data if data is not None else {"features": self.x, "label": self.y, "cluster": self.c}
        loader = TensorBatchLoader(data, batch_size=16)
        ev = ARMEDEvaluator(
            device="cpu",
            val_data_loader=loader,
            network=self.net,
            cluster_mode=mode,
            z_predictor=z_predictor,
            prepare_batch=PrepareBatchCluster("features", require_cluster=False),
            decollate=False,
            **kwargs,
        )
        preds: list[torch.Tensor] = []
        ev.add_event_handler(Events.ITERATION_COMPLETED, lambda e: preds.append(e.state.output["pred"].detach()))
        ev.run()
        return torch.cat(preds), ev

    @parameterized.expand([("observed",), ("fixed",), ("randomized",), ("inferred",)])
    def test_modes_shapes(self, mode):
        pred, ev = self._evaluate(mode, z_predictor=self.zp)
        self.assertEqual(tuple(pred.shape), (40, 1))
        self.assertTrue(torch.isfinite(pred).all())
        self.assertEqual(ev.cluster_mode, mode)

    def test_fixed_equals_network_without_cluster(self):
        pred, _ = self._evaluate("fixed")
        with torch.no_grad():
            torch.testing.assert_close(pred, self.net(self.x))

    def test_observed_without_z_predictor(self):
        pred, ev = self._evaluate("observed")
        with torch.no_grad():
            fixed = self.net(self.x)
            mixed = self.net(self.x, self.c.clamp(min=0))
        torch.testing.assert_close(pred[self.unseen], fixed[self.unseen])
        torch.testing.assert_close(pred[~self.unseen], mixed[~self.unseen])
        self.assertFalse(torch.allclose(pred[~self.unseen], fixed[~self.unseen]))
        self.assertEqual(ev.state.n_unseen, int(self.unseen.sum()))
        self.assertEqual(ev.state.n_unseen, 8)

    def test_observed_with_z_predictor(self):
        pred, ev = self._evaluate("observed", z_predictor=self.zp)
        with torch.no_grad():
            inferred = self.net(self.x, self.zp.membership(self.x))
            mixed = self.net(self.x, self.c.clamp(min=0))
        torch.testing.assert_close(pred[self.unseen], inferred[self.unseen])
        torch.testing.assert_close(pred[~self.unseen], mixed[~self.unseen])
        self.assertEqual(ev.state.n_unseen, 8)

    def test_inferred(self):
        pred, _ = self._evaluate("inferred", z_predictor=self.zp)
        with torch.no_grad():
            torch.testing.assert_close(pred, self.net(self.x, self.zp.membership(self.x)))

    def test_inferred_needs_z_predictor(self):
        with self.assertRaisesRegex(ValueError, "z_predictor"):
            self._evaluate("inferred")
        _, ev = self._evaluate("fixed")
        with self.assertRaisesRegex(ValueError, "z_predictor"):
            ev.cluster_mode = "inferred"
        with self.assertRaisesRegex(ValueError, "cluster_mode"):
            ev.cluster_mode = "bogus"

    def test_randomized_reproducible(self):
        first, ev = self._evaluate("randomized", seed=3)
        second, _ = self._evaluate("randomized", seed=3)
        torch.testing.assert_close(first, second)
        ev.run()  # rerun of the same evaluator reseeds
        torch.testing.assert_close(ev.state.output["pred"], first[32:])
        other, _ = self._evaluate("randomized", seed=4)
        self.assertFalse(torch.allclose(first, other))
        observed, _ = self._evaluate("observed")
        self.assertFalse(torch.allclose(first, observed))

    def test_no_cluster_key(self):
        data = {"features": self.x, "label": self.y}
        pred, ev = self._evaluate("observed", data=data)
        with torch.no_grad():
            torch.testing.assert_close(pred, self.net(self.x))
        self.assertEqual(ev.state.n_unseen, 40)

    def test_n_unseen_zero_in_other_modes(self):
        _, ev = self._evaluate("fixed")
        self.assertEqual(ev.state.n_unseen, 0)


class TestOptionalClusterAtInference(unittest.TestCase):
    """A batch that mixes items with and without a cluster: DataLoader collation, PrepareBatchCluster, evaluator."""

    @classmethod
    def setUpClass(cls):
        torch.manual_seed(0)
        cls.net = MixedEffectsMLP(2, 1, n_clusters=3, random_slopes="both").eval()
        with torch.no_grad():  # clearly non-zero random effects, so mixed, inferred and fixed predictions differ
            for param in cls.net.random_effects.parameters():
                param.add_(torch.randn_like(param))
        cls.zp = ZPredictor(in_features=2, n_clusters=3).eval()
        cls.vocab = ClusterVocabulary(["a", "b", "c"])
        x = torch.randn(10, 2)
        cls.items = [
            {"features": x[i], **({"cluster": "abc"[i % 3]} if i % 4 else {})} for i in range(10)
        ]  # items 0, 4, 8 have no cluster
        cls.without = torch.tensor([i % 4 == 0 for i in range(10)])

    def _predict(self, items, mode="observed", z_predictor=None):
        transform = ClusterIndexd("cluster", self.vocab, missing_as_unseen=True)
        loader = DataLoader(Dataset(items, transform=transform), batch_size=6)
        ev = ARMEDEvaluator(
            "cpu", loader, self.net, cluster_mode=mode, z_predictor=z_predictor,
            prepare_batch=PrepareBatchCluster("features", require_cluster=False), decollate=False,
        )  # fmt: skip
        preds: list[torch.Tensor] = []
        ev.add_event_handler(Events.ITERATION_COMPLETED, lambda e: preds.append(e.state.output["pred"].detach()))
        ev.run()
        return torch.cat(preds), ev

    def test_rows_without_cluster_get_the_inferred_prediction(self):
        pred, ev = self._predict(self.items, z_predictor=self.zp)
        alone, _ = self._predict([d for d, w in zip(self.items, self.without) if w], "inferred", self.zp)
        with_cluster, _ = self._predict([d for d, w in zip(self.items, self.without) if not w])
        torch.testing.assert_close(pred[self.without], alone)
        torch.testing.assert_close(pred[~self.without], with_cluster)
        fixed, _ = self._predict(self.items, "fixed")
        self.assertFalse(torch.allclose(pred[self.without], fixed[self.without]))
        self.assertEqual(ev.state.n_unseen, 3)

    def test_rows_without_cluster_get_fixed_effects_without_z_predictor(self):
        pred, _ = self._predict(self.items)
        fixed, _ = self._predict([d for d, w in zip(self.items, self.without) if w], "fixed")
        torch.testing.assert_close(pred[self.without], fixed)
        self.assertFalse(torch.allclose(pred[~self.without], self._predict(self.items, "fixed")[0][~self.without]))

    def test_raw_ids_in_a_batch_are_named(self):
        batch = {"features": torch.zeros(2, 2), "cluster": ["a", "b"]}
        with self.assertRaisesRegex(TypeError, "batch key 'cluster' holds raw cluster ids.*ClusterIndexd"):
            PrepareBatchCluster("features")(batch)


class TestLogitClassificationLoss(unittest.TestCase):
    def test_binary(self):
        logits = torch.randn(6, 1, generator=torch.Generator().manual_seed(0))
        label = torch.tensor([0, 1, 1, 0, 1, 0])
        expected = F.binary_cross_entropy_with_logits(logits[:, 0], label.float())
        loss = LogitClassificationLoss()
        torch.testing.assert_close(loss(logits, label), expected)
        torch.testing.assert_close(loss(logits, label.float().unsqueeze(1)), expected)
        torch.testing.assert_close(nn.BCEWithLogitsLoss()(logits, label.float().unsqueeze(1)), expected)

    def test_multiclass(self):
        logits = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
        label = torch.tensor([0, 2, 1, 0, 2, 2])
        torch.testing.assert_close(LogitClassificationLoss()(logits, label), nn.CrossEntropyLoss()(logits, label))
        w = torch.tensor([0.5, 1.0, 2.0])
        per_row = nn.CrossEntropyLoss(reduction="none")(logits, label)
        # Keras' class_weight: weighted rows over the batch size (torch divides by the weights' sum)
        torch.testing.assert_close(LogitClassificationLoss(class_weight=w)(logits, label), (per_row * w[label]).mean())
        for dtype in (torch.int32, torch.uint8, torch.float64):
            torch.testing.assert_close(
                LogitClassificationLoss()(logits, label.to(dtype)), nn.CrossEntropyLoss()(logits, label)
            )

    def test_one_and_two_logits_weigh_classes_alike(self):
        z = torch.randn(4, generator=torch.Generator().manual_seed(0))
        label, w = torch.tensor([0, 0, 0, 1]), torch.tensor([0.25, 1.75])
        loss = LogitClassificationLoss(class_weight=w)
        torch.testing.assert_close(loss(z[:, None], label), loss(torch.stack([torch.zeros(4), z], 1), label))

    def test_binary_class_weight(self):
        logits = torch.randn(4, 1, generator=torch.Generator().manual_seed(0))
        label = torch.tensor([0, 0, 0, 1])
        w = torch.tensor([0.5, 1.5])
        expected = F.binary_cross_entropy_with_logits(logits[:, 0], label.float(), weight=w[label])
        torch.testing.assert_close(LogitClassificationLoss(class_weight=w)(logits, label), expected)

    def test_bad_labels(self):
        with self.assertRaisesRegex(ValueError, r"expected 0\.\.2.*\[0, 3\]"):
            LogitClassificationLoss()(torch.randn(2, 3), torch.tensor([0, 3]))
        with self.assertRaisesRegex(ValueError, r"expected 0\.\.1"):
            LogitClassificationLoss()(torch.randn(2, 1), torch.tensor([-1, 0]))
        with self.assertRaisesRegex(ValueError, "whole numbers"):
            LogitClassificationLoss()(torch.randn(2, 1), torch.tensor([0.5, 1.0]))
        with self.assertRaisesRegex(ValueError, r"\(batch, classes\), got shape \(2,\)"):
            LogitClassificationLoss()(torch.randn(2), torch.tensor([0, 1]))
        with self.assertRaisesRegex(ValueError, "class_weight has 3 values but the logits have 2 classes"):
            LogitClassificationLoss(class_weight=[1.0, 1.0, 1.0])(torch.randn(2, 1), torch.tensor([0, 1]))
        with self.assertRaisesRegex(ValueError, "cluster has 1 values for 4 rows"):
            cluster_confusion_loss(torch.randn(4, 5), torch.tensor([0]))

    def test_balanced_class_weights(self):
        w = balanced_class_weights(torch.tensor([0, 0, 0, 1]))
        self.assertAlmostEqual(float(w[1] / w[0]), 3.0, places=5)
        self.assertAlmostEqual(float(w.mean()), 1.0, places=5)
        w3 = balanced_class_weights(torch.tensor([0, 1, 1, 2, 2, 2, 2]), n_classes=3)
        torch.testing.assert_close(w3 / w3[2], torch.tensor([4.0, 2.0, 1.0]))
        with self.assertRaisesRegex(ValueError, "at least one"):
            balanced_class_weights(torch.tensor([0, 0]), n_classes=2)
        with self.assertRaisesRegex(ValueError, r"classes 0\.\.1, got values \[0, 1, 2\]"):
            balanced_class_weights(torch.tensor([0, 1, 2, 1]), n_classes=2)


class TestTensorBatchLoader(unittest.TestCase):
    def _data(self, n: int = 10):
        return {"features": torch.arange(n * 2).reshape(n, 2).float(), "label": torch.arange(n)}

    def test_len_and_batches(self):
        loader = TensorBatchLoader(self._data(10), batch_size=4)
        self.assertEqual(len(loader), 3)
        batches = list(loader)
        self.assertEqual([len(b["label"]) for b in batches], [4, 4, 2])
        self.assertEqual(torch.cat([b["label"] for b in batches]).tolist(), list(range(10)))
        self.assertEqual(tuple(batches[0]["features"].shape), (4, 2))

    def test_drop_last(self):
        loader = TensorBatchLoader(self._data(10), batch_size=4, drop_last=True)
        self.assertEqual(len(loader), 2)
        self.assertEqual([len(b["label"]) for b in loader], [4, 4])

    def test_shuffle_reproducible(self):
        def epochs(seed):
            loader = TensorBatchLoader(self._data(20), batch_size=5, shuffle=True, seed=seed)
            return [torch.cat([b["label"] for b in loader]).tolist() for _ in range(2)]

        a, b = epochs(0), epochs(0)
        self.assertEqual(a, b)
        self.assertNotEqual(a[0], a[1])  # reshuffled every epoch
        self.assertNotEqual(a[0], list(range(20)))
        self.assertEqual(sorted(a[0]), list(range(20)))
        self.assertNotEqual(a, epochs(1))

    def test_an_epoch_gathers_once(self):
        loader = TensorBatchLoader(self._data(12), batch_size=5, shuffle=True, seed=2)
        for _ in range(2):
            batches = list(loader)
            bases = {b["features"].untyped_storage().data_ptr() for b in batches}
            self.assertEqual(len(bases), 1, "the batches are views of one shuffled copy")
            self.assertNotEqual(bases, {loader.data["features"].untyped_storage().data_ptr()})

    def test_rows_stay_aligned(self):
        loader = TensorBatchLoader(self._data(12), batch_size=5, shuffle=True, seed=2)
        for batch in loader:
            torch.testing.assert_close(batch["features"][:, 0], 2.0 * batch["label"].float())

    def test_datalist(self):
        datalist = [{"features": [float(i), 0.0], "label": i, "name": f"s{i}"} for i in range(5)]
        loader = TensorBatchLoader(datalist, batch_size=2, keys=["features", "label"])
        self.assertEqual(set(loader.data), {"features", "label"})
        self.assertEqual(len(loader), 3)

    def test_errors(self):
        with self.assertRaisesRegex(ValueError, "same number"):
            TensorBatchLoader({"features": torch.zeros(5, 2), "label": torch.zeros(4)})
        with self.assertRaisesRegex(ValueError, "batch_size"):
            TensorBatchLoader(self._data(), batch_size=0)
        with self.assertRaisesRegex(KeyError, "label"):
            TensorBatchLoader([{"features": 1.0, "label": 0}, {"features": 2.0}])


if __name__ == "__main__":
    unittest.main()


class TestSingleRowBatches(unittest.TestCase):
    """A last batch of one row is refused at the first batch only where torch would fail on it: a BatchNorm1d that
    normalises over the batch alone (2-D input), in a batch the run reaches."""

    def test_a_batch_norm_over_the_batch_alone_is_refused_before_any_step(self):
        net, _ = _models()
        adv = ClusterAdversary(net.feature_channels, n_clusters=N_CLUSTERS, hidden_channels=(8,), input_norm=True)
        before = [p.detach().clone() for p in (*net.parameters(), *adv.parameters())]
        trainer = _trainer(_loader(n=33, batch_size=32), net, adv, epochs=1)
        with self.assertRaisesRegex(ValueError, r"batches of 32 from 33 items .* BatchNorm1d 'adversary.input_norm'"):
            trainer.run()
        for old, new in zip(before, (*net.parameters(), *adv.parameters())):
            torch.testing.assert_close(old, new)
        self.assertEqual(trainer._single_row_guards, [], "the hooks are removed")
        self.assertFalse(any(m._forward_pre_hooks for m in adv.modules()))

    def test_a_batch_norm_over_length_and_a_run_that_stops_before_the_last_batch_train(self):
        torch.manual_seed(0)
        net = ARMED(DenseNet121(spatial_dims=1, in_channels=1, out_channels=2, init_features=4, growth_rate=4,
                                block_config=(1, 1)), n_clusters=2, in_shape=(1, 32))  # fmt: skip
        data = {"image": torch.rand(5, 1, 32), "label": torch.tensor([0, 1, 0, 1, 0]), "cluster": torch.tensor([0, 1] * 2 + [0])}
        loader = TensorBatchLoader(data, batch_size=4)
        ARMEDTrainer("cpu", 1, loader, net, torch.optim.Adam(net.parameters()), decollate=False).run()  # (1, C, L) rows
        mlp, adv = _models()
        adv = ClusterAdversary(mlp.feature_channels, n_clusters=N_CLUSTERS, hidden_channels=(8,), input_norm=True)
        trainer = _trainer(_loader(n=33, batch_size=32), mlp, adv, epochs=1, epoch_length=1)
        trainer.run()  # the one-row batch is never drawn
        self.assertEqual(trainer.state.iteration, 1)

    def test_a_loader_without_a_sampler_trains(self):
        class Batches(list):  # batch_size and a length, but no sampler or dataset to count items
            batch_size = 32

        net, adv = _models()
        trainer = _trainer(Batches(_loader(n=64, batch_size=32)), net, adv, epochs=1, n_train=64)
        trainer.run()
        self.assertEqual(trainer.state.iteration, 2)


class TestGradientScalingAndLossChoices(unittest.TestCase):
    """One backward pass, one gradient scale; losses that cannot train are refused before they mislead."""

    def _loader(self):
        x, y, c = _problem(32)
        return TensorBatchLoader({"features": x, "label": y, "cluster": c}, batch_size=16)

    def test_a_simultaneous_adversary_steps_through_the_main_steps_scaler(self):
        # CPU gradient scalers stand in for CUDA's (the same class): the adversary's gradients come from the main
        # backward, which only the main scaler scaled; stepping them through the adversary's own scaler asserted
        net, adv = _models()
        trainer = _trainer(self._loader(), net, adv, epochs=1, adversary_update="simultaneous")
        before = _flat(adv)

        @trainer.on(Events.STARTED)
        def _scalers(engine):
            engine.scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
            for player in engine.players.values():
                player.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)

        trainer.run()
        after = _flat(adv)
        self.assertTrue(torch.isfinite(after).all() and not torch.equal(after, before))
        self.assertEqual(trainer.scaler.get_scale(), 4.0)  # updated once per iteration, no overflow

    def test_amp_off_cuda_a_summed_torch_loss_and_cross_entropy_on_one_logit_are_refused(self):
        net, adv = _models()
        with self.assertRaisesRegex(ValueError, "amp=True needs a CUDA device"):
            _trainer(self._loader(), net, adv, amp=True)
        with self.assertRaisesRegex(ValueError, r"reduction='sum'\) makes the data term batch_size times too heavy"):
            _trainer(self._loader(), net, adv, loss_function=nn.BCEWithLogitsLoss(reduction="sum"))
        with self.assertRaisesRegex(ValueError, "CrossEntropyLoss on a one-logit output is 0"):
            _trainer(self._loader(), net, adv, epochs=1, loss_function=nn.CrossEntropyLoss()).run()
