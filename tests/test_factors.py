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
"""Several grouping factors through the engine path: prepare_batch, ARMEDTrainer, ARMEDEvaluator and its handlers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ignite.engine import Events

from monai_armed.data import TensorBatchLoader
from monai_armed.engines import (
    ARMEDEvaluator,
    ARMEDTrainer,
    PrepareBatchCluster,
    PrepareBatchClusterTarget,
    resolve_cluster,
)
from monai_armed.handlers import ClusterModeReport, PredictionCollector, output_field
from monai_armed.losses import GaussianLikelihood
from monai_armed.networks import ClusterAdversary, FactorSpec, MixedModelNet, ZPredictor

N_SITES, N_SUBJECTS, N_ROWS = 4, 20, 320
FACTORS = ["site", "subject"]


def _data(seed: int = 0) -> dict[str, torch.Tensor]:
    """Crossed site x subject: y = 1 + 2 x + site effect + subject effect + noise; input columns [1, x | 1 | 1]."""
    g = torch.Generator().manual_seed(seed)
    site = torch.arange(N_ROWS) % N_SITES
    subject = torch.randperm(N_ROWS, generator=g) % N_SUBJECTS  # crossed with site
    x = torch.randn(N_ROWS, generator=g)
    site_effect = torch.tensor([-2.0, -0.7, 0.7, 2.0])
    subject_effect = 1.5 * torch.randn(N_SUBJECTS, generator=g)
    y = 1.0 + 2.0 * x + site_effect[site] + subject_effect[subject] + 0.3 * torch.randn(N_ROWS, generator=g)
    one = torch.ones(N_ROWS)
    features = torch.stack([one, x, one, one], dim=1)
    return {"features": features, "label": y.unsqueeze(1), "site": site, "subject": subject}


def _net(seed: int = 0) -> MixedModelNet:
    torch.manual_seed(seed)
    per_site, per_subject = [N_ROWS / N_SITES] * N_SITES, [N_ROWS / N_SUBJECTS] * N_SUBJECTS
    return MixedModelNet(
        2, {"site": FactorSpec(N_SITES, counts=per_site), "subject": FactorSpec(N_SUBJECTS, counts=per_subject)}
    )


def _prepare(**kwargs) -> PrepareBatchCluster:
    return PrepareBatchCluster(image_key="features", cluster_key=FACTORS, **kwargs)


def _train(net: MixedModelNet, epochs: int = 6, decollate: bool = False, adversary_factor: str = "site"):
    data = _data()
    adversary = ClusterAdversary(net.feature_channels, n_clusters=N_SITES, hidden_channels=(8,))
    logit_classes: list[int] = []
    adversary.register_forward_hook(lambda module, args, out: logit_classes.append(out.shape[1]))
    trainer = ARMEDTrainer(
        device="cpu",
        max_epochs=epochs,
        train_data_loader=TensorBatchLoader(data, batch_size=64, shuffle=True),
        network=net,
        optimizer=torch.optim.Adam(net.parameters(), lr=0.05),
        loss_function=GaussianLikelihood(),
        adversary=adversary,
        adv_weight=0.1,
        adversary_factor=adversary_factor,
        prepare_batch=_prepare(),
        decollate=decollate,
    )
    epoch_loss: list[list[float]] = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: epoch_loss.append([]))
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: epoch_loss[-1].append(float(e.output_scalars["loss_me"]))
    )
    trainer.run()
    return trainer, logit_classes, epoch_loss


@pytest.fixture(scope="module")
def trained() -> MixedModelNet:
    net = _net()
    _train(net)
    return net.eval()


def _eval_batch() -> dict[str, torch.Tensor]:
    """One evaluation batch: rows 0-7 of an unseen site, rows 8-15 of an unseen subject, the rest seen."""
    data = {k: v[:48].clone() for k, v in _data(seed=1).items()}
    data["site"][:8] = -1
    data["subject"][8:16] = -1
    return data


def _evaluate(net: MixedModelNet, mode: str, z_predictor: ZPredictor | None = None, **kwargs) -> torch.Tensor:
    evaluator = ARMEDEvaluator(
        device="cpu",
        val_data_loader=TensorBatchLoader(_eval_batch(), batch_size=48),
        network=net,
        cluster_mode=mode,
        z_predictor=z_predictor,
        prepare_batch=_prepare(require_cluster=False),
        decollate=False,
        **kwargs,
    )
    preds: list[torch.Tensor] = []
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: preds.append(e.state.output["pred"]))
    evaluator.run()
    return torch.cat(preds), evaluator


def _zp() -> ZPredictor:
    torch.manual_seed(3)
    return ZPredictor(in_features=4, n_clusters=N_SITES).eval()


# prepare_batch


def test_prepare_batch_two_keys_gives_a_mapping_on_the_device():
    batch = {k: v[:8] for k, v in _data().items()}
    inputs, targets, args, kwargs = _prepare()(batch, torch.device("cpu"))
    cluster = kwargs["cluster"]
    assert list(cluster) == FACTORS and args == ()
    assert all(c.dtype == torch.int64 and c.device.type == "cpu" for c in cluster.values())
    assert torch.equal(cluster["subject"], batch["subject"]) and torch.equal(cluster["site"], batch["site"])
    # a single key is still the tensor itself
    single = PrepareBatchCluster(image_key="features", cluster_key="site")(batch)[3]["cluster"]
    assert isinstance(single, torch.Tensor) and torch.equal(single, batch["site"])


def test_prepare_batch_two_keys_errors_name_the_key():
    batch = {k: v[:4] for k, v in _data().items()}
    with pytest.raises(TypeError, match=r"batch key 'subject' holds raw cluster ids.*ClusterIndexd"):
        _prepare()({**batch, "subject": ["s1", "s2", "s3", "s4"]})
    without_subject = {k: v for k, v in batch.items() if k != "subject"}
    with pytest.raises(KeyError, match="no cluster key 'subject'"):
        _prepare()(without_subject)
    # not required: an absent factor is unseen (-1) for that factor only; no factor at all is no cluster
    cluster = _prepare(require_cluster=False)(without_subject)[3]["cluster"]
    assert list(cluster) == FACTORS and cluster["subject"].tolist() == [-1] * 4
    assert torch.equal(cluster["site"], batch["site"])
    assert _prepare(require_cluster=False)({"features": batch["features"]})[3]["cluster"] is None
    with pytest.raises(ValueError, match="distinct"):
        PrepareBatchCluster(cluster_key=["site", "site"])


def test_prepare_batch_cluster_target_picks_the_target_key():
    batch = {k: v[:8] for k, v in _data().items()}
    inputs, target = PrepareBatchClusterTarget("features", cluster_key=FACTORS, target_key="subject")(batch)
    assert torch.equal(target, batch["subject"])
    _, first = PrepareBatchClusterTarget("features", cluster_key=FACTORS)(batch)
    assert torch.equal(first, batch["site"])
    with pytest.raises(ValueError, match="target_key 'scanner' is not one of the cluster keys"):
        PrepareBatchClusterTarget("features", cluster_key=FACTORS, target_key="scanner")
    with pytest.raises(KeyError, match="no cluster key 'site' to train a Z-predictor on"):
        PrepareBatchClusterTarget("features", cluster_key=FACTORS)({k: v for k, v in batch.items() if k != "site"})


# ARMEDTrainer


def test_trainer_two_factors_adversary_reads_site_and_loss_decreases():
    net = _net()
    before = {f: layer.loc.detach().clone() for f, layer in net.random_effects.items()}
    trainer, logit_classes, epoch_loss = _train(net)
    assert logit_classes and set(logit_classes) == {N_SITES}
    out = trainer.state.output
    assert list(out["cluster"]) == FACTORS
    assert 0.0 <= float(out["adv_accuracy"]) <= 1.0 and "loss_gen" in out
    assert np.mean(epoch_loss[-1]) < 0.5 * np.mean(epoch_loss[0])
    for factor, layer in net.random_effects.items():  # both factors learned effects
        assert not torch.allclose(layer.loc, before[factor]), factor
    # a 4-class adversary on the 20-level subject factor is refused when the trainer is built, naming both
    with pytest.raises(ValueError, match="predicts 4 clusters but grouping factor 'subject' has 20 levels"):
        _train(_net(), epochs=1, adversary_factor="subject")


def test_trainer_two_factors_decollates():
    trainer, _, _ = _train(_net(), epochs=1, decollate=True)
    out = trainer.state.output
    assert isinstance(out, list) and len(out) == 64
    assert set(out[0]["cluster"]) == set(FACTORS)
    cluster = output_field(out, "cluster", factor="subject")
    assert cluster.shape == (len(out),) and int(cluster.max()) < N_SUBJECTS
    assert float(trainer.output_scalars["loss"]) == pytest.approx(float(out[0]["loss"]))


# ARMEDEvaluator


def test_evaluator_observed_and_fixed(trained):
    batch = _eval_batch()
    cluster = {"site": batch["site"], "subject": batch["subject"]}
    with torch.no_grad():
        observed_expected, fixed_expected = trained(batch["features"], cluster), trained(batch["features"])
    observed, evaluator = _evaluate(trained, "observed")
    assert observed.shape == (48, 1)
    torch.testing.assert_close(observed, observed_expected)
    assert evaluator.n_clusters == {"site": N_SITES, "subject": N_SUBJECTS}
    assert evaluator.state.n_unseen == 16 and evaluator.state.n_unseen_by_factor == {"site": 8, "subject": 8}
    fixed, _ = _evaluate(trained, "fixed")
    torch.testing.assert_close(fixed, fixed_expected)
    assert (observed - fixed).abs()[16:].min() > 1e-3  # the seen rows carry both random effects


def test_evaluator_inferred_one_factor_others_observed(trained):
    batch, zp = _eval_batch(), _zp()
    x, site, subject = batch["features"], batch["site"], batch["subject"]
    with torch.no_grad():
        membership = zp.membership(x)
        observed = trained(x, {"site": site, "subject": subject})
        expected = trained(x, {"site": membership, "subject": subject})
        without_subject = trained(x, {"site": membership, "subject": torch.full_like(subject, -1)})
    inferred, evaluator = _evaluate(trained, "inferred", zp, inferred_factor="site")
    assert inferred.shape == (48, 1)
    torch.testing.assert_close(inferred, expected)
    # the unseen-site rows now get the inferred site effect, and they keep their observed subject effect
    assert (inferred[:8] - observed[:8]).abs().min() > 1e-4
    assert (inferred[:8] - without_subject[:8]).abs().min() > 1e-3
    # observed mode with a Z-predictor: only the unseen sites are inferred; an unseen subject stays a zero effect
    fallback, evaluator = _evaluate(trained, "observed", zp, inferred_factor="site")
    torch.testing.assert_close(fallback[:8], expected[:8])
    torch.testing.assert_close(fallback[8:], observed[8:])
    with pytest.raises(ValueError, match="Z-predictor has 4 clusters but the factor 'subject'"):
        _evaluate(trained, "inferred", zp, inferred_factor="subject")


def test_evaluator_randomized_draws_each_factor_among_its_levels(trained):
    batch = _eval_batch()
    randomized, evaluator = _evaluate(trained, "randomized", seed=5)
    again, _ = _evaluate(trained, "randomized", seed=5)
    torch.testing.assert_close(randomized, again)  # reproducible
    drawn = resolve_cluster(
        "randomized", batch["features"], None, evaluator.n_clusters, generator=torch.Generator().manual_seed(5)
    )
    assert list(drawn) == FACTORS
    assert 0 <= int(drawn["site"].min()) and int(drawn["site"].max()) < N_SITES
    assert 0 <= int(drawn["subject"].min()) and int(drawn["subject"].max()) < N_SUBJECTS
    assert len(drawn["subject"].unique()) > N_SITES  # drawn from the subject's own 20 levels
    with torch.no_grad():
        torch.testing.assert_close(randomized, trained(batch["features"], drawn))
    with pytest.raises(ValueError, match="needs n_clusters as a mapping"):
        resolve_cluster("randomized", batch["features"], {"site": batch["site"]}, 4)


def test_evaluator_handlers_read_one_factor(trained):
    evaluator = ARMEDEvaluator(
        device="cpu",
        val_data_loader=TensorBatchLoader(_eval_batch(), batch_size=16),
        network=trained,
        prepare_batch=_prepare(require_cluster=False),
    )
    subjects = PredictionCollector(cluster_factor="subject")
    subjects.attach(evaluator)
    data = _eval_batch()
    data["label"] = (data["label"] > data["label"].median()).float()
    report = ClusterModeReport(evaluator, {"eval": TensorBatchLoader(data, batch_size=16)}, {"eval": ["observed"]})
    results = report.run()
    assert report.cluster_factor == "site"
    assert torch.equal(report.collector.cluster, data["site"]) and torch.equal(subjects.cluster, data["subject"])
    assert set(results["eval"]["observed"]["per_cluster"]) == {"0", "1", "2", "3", "unseen"}
    with pytest.raises(KeyError, match="no grouping factor 'scanner'"):
        output_field({"cluster": {"site": data["site"]}}, "cluster", factor="scanner")


# inputs a user of several factors plausibly gets wrong


def test_per_factor_input_errors_name_the_factor():
    net, x = _net(), torch.zeros(2, 4)
    with pytest.raises(IndexError, match="grouping factor 'subject': cluster index 20 is out of range"):
        net(x, {"site": torch.tensor([0, 1]), "subject": torch.tensor([0, 20])})
    with pytest.raises(ValueError, match=r"grouping factor 'site': soft cluster membership must have shape \(batch, 4\)"):
        net(x, {"site": torch.rand(2, 3), "subject": torch.tensor([0, 1])})


def test_clusters_of_the_wrong_kind_for_a_one_factor_network_are_named():
    from monai_armed.networks import MixedEffectsMLP

    net, x = MixedEffectsMLP(4, 1, n_clusters=4), torch.zeros(2, 4)
    with pytest.raises(TypeError, match=r"one grouping factor: pass its clusters as one tensor, not a mapping of factors \['site'"):
        net(x, {"site": torch.tensor([0, 1]), "subject": torch.tensor([0, 1])})
    with pytest.raises(TypeError, match="got list: map raw cluster ids with ClusterIndexd"):
        net(x, ["S0", "S1"])


def test_an_index_below_minus_one_after_the_first_batch_is_refused():
    """After the first batch the range is not read back, but on the CPU the minimum is read anyway (for the unseen
    rows), so a -2 (a mapping error) is refused instead of being taken for unseen."""
    from monai_armed.utils import batch_checks

    net, x = _net(), torch.zeros(2, 4)
    with batch_checks(False):
        net(x, {"site": torch.tensor([0, -1]), "subject": torch.tensor([0, 1])})  # -1: unseen, fine
        with pytest.raises(IndexError, match="grouping factor 'site': cluster index -2 is out of range"):
            net(x, {"site": torch.tensor([0, -2]), "subject": torch.tensor([0, 1])})


def test_per_cluster_tables_must_be_of_the_factor_they_name():
    from monai_armed.handlers import PerClusterRegression

    evaluator = ARMEDEvaluator(device="cpu", val_data_loader=TensorBatchLoader(_data(), batch_size=64), network=_net(),
                               prepare_batch=_prepare())  # fmt: skip
    with pytest.raises(ValueError, match=r"tabulates grouping factor 'site' \(the first\), which has 4 levels, but got "
                                         r"n_clusters=20 and 20 cluster_names; pass cluster_factor="):
        PerClusterRegression(N_SUBJECTS, [f"p{i}" for i in range(N_SUBJECTS)]).attach(evaluator)
    with pytest.raises(KeyError, match="cluster_factor 'center' is not a grouping factor"):
        PerClusterRegression(N_SUBJECTS, cluster_factor="center").attach(evaluator)
    PerClusterRegression(N_SUBJECTS, [f"p{i}" for i in range(N_SUBJECTS)], cluster_factor="subject").attach(evaluator)
    evaluator.run()
    assert len(evaluator.state.metric_details["per_cluster_regression"]) >= N_SUBJECTS


def test_checkpoint_levels_are_checked_per_factor(tmp_path):
    from monai_armed.networks.utils import load_network_checkpoint

    torch.save(_net().state_dict(), tmp_path / "model.pt")
    other = MixedModelNet(2, {"site": FactorSpec(N_SITES), "subject": FactorSpec(N_SUBJECTS - 1)})
    with pytest.raises(ValueError, match="trained with 20 levels of grouping factor 'subject' but the network has 19"):
        load_network_checkpoint(other, str(tmp_path / "model.pt"))
    with pytest.raises(ValueError, match="grouping factor 'subject': 20 in the network, 21 expected"):
        load_network_checkpoint(_net(), str(tmp_path / "model.pt"), n_clusters={"site": N_SITES, "subject": 21})
    with pytest.raises(ValueError, match="give n_clusters per factor"):
        load_network_checkpoint(_net(), str(tmp_path / "model.pt"), n_clusters=N_SITES)
    load_network_checkpoint(_net(), str(tmp_path / "model.pt"), n_clusters={"site": N_SITES, "subject": N_SUBJECTS})


def test_sparse_random_effects_need_an_optimizer_that_takes_sparse_gradients():
    from monai_armed.optimizers import LazyAdam

    net = MixedModelNet(2, {"site": FactorSpec(N_SITES), "subject": FactorSpec(N_SUBJECTS)}, sparse=True)
    loader = TensorBatchLoader(_data(), batch_size=64)
    common = dict(device="cpu", max_epochs=1, train_data_loader=loader, network=net, loss_function=GaussianLikelihood(),
                  prepare_batch=_prepare(), n_train=N_ROWS)  # fmt: skip
    with pytest.raises(TypeError, match="sparse gradients .* Adam cannot take: use monai_armed.optimizers.LazyAdam"):
        ARMEDTrainer(optimizer=torch.optim.Adam(net.parameters()), **common)
    # SparseAdam takes the sparse tables but not the dense fixed effects: refused before the run too
    with pytest.raises(TypeError, match="SparseAdam cannot take: use monai_armed.optimizers.LazyAdam"):
        ARMEDTrainer(optimizer=torch.optim.SparseAdam(net.parameters()), **common)
    ARMEDTrainer(optimizer=LazyAdam(net.parameters()), **common).run()


def test_random_effects_summary_names_each_factors_levels():
    from monai_armed.networks.utils import random_effects_summary
    from monai_armed.transforms import ClusterVocabularies

    net = _net()
    vocabularies = ClusterVocabularies({"site": [f"S{i}" for i in range(N_SITES)],
                                        "subject": [f"p{i}" for i in range(N_SUBJECTS)]})  # fmt: skip
    summary = random_effects_summary(net, vocabularies)
    assert summary["clusters"]["subject"][:2] == ["p0", "p1"] and set(summary["groups"]) == set(FACTORS)
    assert summary["groups"]["site"]["clusters"] == ["S0", "S1", "S2", "S3"]
    assert len(summary["groups"]["subject"]["posterior_mean"]) == N_SUBJECTS
    with pytest.raises(ValueError, match="give cluster_names per factor"):
        random_effects_summary(net, [f"p{i}" for i in range(N_SUBJECTS)])
    with pytest.raises(ValueError, match="grouping factor 'site' has 4 levels but 3 cluster_names"):
        random_effects_summary(net, {"site": ["a", "b", "c"]})


def test_checkpoint_levels_are_checked_for_every_random_effects_layer(tmp_path):
    """A network with several unnamed random-effects layers (a head and a norm layer, as the ARMED wrapper builds)
    checks each one's clusters, not only the first's."""
    from monai_armed.networks.layers import RandomEffects
    from monai_armed.networks.utils import load_network_checkpoint

    class TwoLayers(torch.nn.Module):
        def __init__(self, head: int, norm: int) -> None:
            super().__init__()
            self.head, self.norm = RandomEffects(head, 2), RandomEffects(norm, 3)

    torch.save(TwoLayers(4, 4).state_dict(), tmp_path / "model.pt")
    with pytest.raises(ValueError, match="trained with 4 clusters but the network has 5"):
        load_network_checkpoint(TwoLayers(4, 5), str(tmp_path / "model.pt"))
    load_network_checkpoint(TwoLayers(4, 4), str(tmp_path / "model.pt"), n_clusters=4)
