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
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow

from monai_armed.data import save_csv_datalist
from monai_armed.networks import MixedEffectsMLP, load_network_checkpoint
from tests.bundle_workflow import (
    Interrupted,
    assert_same_training,
    check_tracking,
    export_network,
    interrupt_before_epoch,
)

CONFIGS = Path(__file__).resolve().parents[1] / "bundles" / "armed_spirals" / "configs"


def _workflow(config_files, root: Path, **override) -> ConfigWorkflow:
    workflow = ConfigWorkflow(
        config_file=[str(CONFIGS / f) for f in config_files],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        workflow_type="train",
        bundle_root=str(root),
        **override,
    )
    workflow.initialize()
    return workflow


def _clustered_csv(path: Path, n_clusters: int = 5, per_cluster: int = 80) -> None:
    """Labels from x0 + a per-cluster offset: a random intercept the mixed-effects model can learn."""
    rng = np.random.RandomState(0)
    offsets = np.linspace(-1.5, 1.5, n_clusters)
    datalist = []
    for c in range(n_clusters):
        x = rng.randn(per_cluster, 2).astype(np.float32)
        y = (x[:, 0] + offsets[c] + 0.1 * rng.randn(per_cluster) > 0).astype(int)
        datalist += [{"features": xi, "label": int(yi), "cluster": f"site{c}"} for xi, yi in zip(x, y)]
    save_csv_datalist(datalist, path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    _clustered_csv(root / "data.csv")
    overrides = {
        "epochs": 20,
        "learning_rate": 0.02,
        "csv_file": str(root / "data.csv"),
        "generate_default_data": False,
        "n_unseen_clusters": 1,
    }
    workflow = _workflow(["train.json"], root, tracking="mlflow", **overrides)
    workflow.run()
    workflow.finalize()
    return root, overrides


def test_train_writes_checkpoints_metrics_and_figures(trained):
    root, _ = trained
    for name in (
        "models/model.pt",
        "models/zpredictor.pt",
        "models/clusters.json",
        "eval/random_effects.json",
        "eval/per_cluster_accuracy.json",
    ):
        assert (root / name).is_file(), name
    for png in ("decision_boundaries", "feature_importance", "intercepts_vs_balance", "random_effect_spread"):
        assert (root / "eval" / "figures" / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert set(metrics) == {"seen", "unseen"}
    assert set(metrics["seen"]) == {"observed", "fixed", "randomized"} and set(metrics["unseen"]) == {
        "fixed",
        "inferred",
    }
    # the random intercept explains the per-site offset: mixed effects beat fixed effects and chance on seen sites
    assert metrics["seen"]["observed"]["accuracy"] > 0.8
    assert metrics["seen"]["observed"]["accuracy"] > metrics["seen"]["fixed"]["accuracy"]
    assert len(json.loads((root / "models" / "clusters.json").read_text())["clusters"]) == 4
    summary = json.loads((root / "eval" / "random_effects.json").read_text())
    intercepts = np.array(summary["groups"]["intercept"]["posterior_mean"])[:, 0]
    offsets = np.linspace(-1.5, 1.5, 5)[[int(name[len("site") :]) for name in summary["clusters"]]]
    assert np.corrcoef(intercepts, offsets)[0, 1] > 0.8


def test_tracking_records_losses_lr_validation_and_report(trained):
    root, overrides = trained
    parts = ("loss", "loss_me", "loss_fe", "loss_adv", "loss_gen", "loss_kl", "adv_accuracy")
    check_tracking(
        root, parts, overrides["epochs"], "val_accuracy", "unseen/inferred/accuracy",
        validation_extra=["min_cluster_accuracy"],
    )  # fmt: skip


def test_evaluate_and_inference_reload_checkpoint(trained):
    root, overrides = trained
    workflow = _workflow(["train.json", "evaluate.json"], root, **overrides)
    workflow.run()
    assert json.loads((root / "eval" / "metrics.json").read_text())["seen"]["observed"]["n"] > 0
    inference = _workflow(["inference.json"], root, csv_file=str(root / "data.csv"))
    inference.run()
    with open(root / "eval" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 400 and {"cluster", "p_class1"} <= set(rows[0])
    assert all(0.0 <= float(r["p_class1"]) <= 1.0 for r in rows)


def test_inference_reads_the_trained_feature_columns_and_writes_row_ids(trained, tmp_path):
    root, _ = trained
    assert json.loads((root / "models" / "preprocessing.json").read_text()) == {"feature_columns": ["f0", "f1"]}
    with open(root / "data.csv") as f:
        rows = list(csv.DictReader(f))[:3]
    # the user's columns in another order, an id column, a blank line: read by name, joined back by id and line
    data = tmp_path / "patients.csv"
    lines = [f"{r['f1']},pid{i},{r['cluster']},{r['f0']}\n" for i, r in enumerate(rows)]
    data.write_text("f1,pid,cluster,f0\n" + lines[0] + "\n" + "".join(lines[1:]))
    _workflow(["inference.json"], root, csv_file=str(data), id_columns=["pid"]).run()
    with open(root / "eval" / "predictions.csv") as f:
        shuffled = list(csv.DictReader(f))
    assert [(r["csv_line"], r["pid"]) for r in shuffled] == [("2", "pid0"), ("4", "pid1"), ("5", "pid2")]
    original = _predictions(root, root / "data.csv")[:3]
    assert [r["p_class1"] for r in shuffled] == [r["p_class1"] for r in original]
    # other feature columns than the training run's are refused before anything is written
    before = (root / "eval" / "predictions.csv").read_bytes()
    with pytest.raises(RuntimeError) as error:
        _workflow(["inference.json"], root, csv_file=str(data), feature_columns=["f1", "f0"]).run()
    assert "feature_columns: ['f0', 'f1'] in training, ['f1', 'f0'] now" in str(error.value.__cause__)
    assert (root / "eval" / "predictions.csv").read_bytes() == before


def test_inference_refuses_an_output_file_that_is_its_input(trained, tmp_path):
    root, _ = trained
    data = tmp_path / "rows.csv"
    data.write_bytes((root / "data.csv").read_bytes())
    with pytest.raises(RuntimeError) as error:
        _workflow(["inference.json"], root, csv_file=str(data), output_file=str(data)).run()
    assert "rows.csv: writing it would replace the input" in str(error.value.__cause__)
    assert data.read_bytes() == (root / "data.csv").read_bytes()


def _predictions(root: Path, csv_file: Path) -> list[dict]:
    _workflow(["inference.json"], root, csv_file=str(csv_file)).run()
    with open(root / "eval" / "predictions.csv") as f:
        return list(csv.DictReader(f))


def test_inference_without_cluster_column_or_with_empty_cells(trained, tmp_path, capsys):
    root, _ = trained
    with open(root / "data.csv") as f:
        rows = list(csv.DictReader(f))[::20]
    no_column, mixed = tmp_path / "no_cluster.csv", tmp_path / "mixed.csv"
    no_column.write_text("f0,f1\n" + "".join(f"{r['f0']},{r['f1']}\n" for r in rows))
    cells = [r["cluster"] if i % 2 else "" for i, r in enumerate(rows)]
    mixed.write_text("f0,f1,cluster\n" + "".join(f"{r['f0']},{r['f1']},{c}\n" for r, c in zip(rows, cells)))
    without = _predictions(root, no_column)  # the bundle's logging.conf logs to stdout
    assert "no_cluster.csv: no cluster column 'cluster', so the clusters are unknown" in capsys.readouterr().out
    assert len(without) == len(rows) and {r["cluster"] for r in without} == {""}
    assert all(0.0 <= float(r["p_class1"]) <= 1.0 for r in without)
    observed = _predictions(root, root / "data.csv")[::20]
    both = _predictions(root, mixed)
    assert [r["cluster"] for r in both] == cells
    # rows without a cluster get the Z-predictor's prediction, rows with one their cluster's, in the same batch
    expected = [float((w if i % 2 == 0 else o)["p_class1"]) for i, (w, o) in enumerate(zip(without, observed))]
    np.testing.assert_allclose([float(r["p_class1"]) for r in both], expected, atol=2e-6)
    assert not np.allclose([float(r["p_class1"]) for r in without], [float(r["p_class1"]) for r in observed])


def test_checkpoint_for_other_number_of_clusters_is_rejected(trained):
    root, _ = trained
    other = MixedEffectsMLP(2, 1, n_clusters=7)
    with pytest.raises(ValueError, match="trained with 4 clusters but the network has 7"):
        load_network_checkpoint(other, str(root / "models" / "model.pt"))


def test_missing_csv_column_names_the_file(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("f0,f1,label\n0.1,0.2,1\n")
    workflow = _workflow(["train.json"], tmp_path, csv_file=str(bad), generate_default_data=False)
    with pytest.raises(RuntimeError) as error:
        workflow.run()
    assert isinstance(error.value.__cause__, ValueError)
    assert "bad.csv" in str(error.value.__cause__) and "missing column(s) ['cluster']" in str(error.value.__cause__)


def test_evaluation_with_another_split_is_refused_before_loading(trained, tmp_path):
    root, overrides = trained
    metrics = (root / "eval" / "metrics.json").read_bytes()
    for change, message in (
        ({"test_fraction": 0.5}, "test_fraction: 0.2 in training, 0.5 now"),
        ({"n_unseen_clusters": 2}, "n_unseen_clusters: 1 in training, 2 now"),
    ):
        workflow = _workflow(["train.json", "evaluate.json"], root, **{**overrides, **change})
        with pytest.raises(RuntimeError) as error:
            workflow.run()
        assert message in str(error.value.__cause__) and "trained on another split" in str(error.value.__cause__)
    other = tmp_path / "other.csv"
    _clustered_csv(other, per_cluster=81)
    workflow = _workflow(["train.json", "evaluate.json"], root, **{**overrides, "csv_file": str(other)})
    with pytest.raises(RuntimeError) as error:
        workflow.run()
    assert "other.csv is not the content of" in str(error.value.__cause__)
    assert (root / "eval" / "metrics.json").read_bytes() == metrics


def test_a_label_outside_the_classes_names_its_line_before_training(tmp_path):
    bad = tmp_path / "labels.csv"
    _clustered_csv(bad)
    lines = bad.read_text().splitlines()
    lines[7] = lines[7].rsplit(",", 2)[0] + ",2," + lines[7].rsplit(",", 1)[1]
    bad.write_text("\n".join(lines) + "\n")
    workflow = _workflow(["train.json"], tmp_path, csv_file=str(bad), generate_default_data=False)
    with pytest.raises(RuntimeError) as error:
        workflow.run()
    assert "labels.csv, line 8, column 'label': label '2' is outside the model's classes; expected 0, 1" in str(
        error.value.__cause__
    )
    assert not (tmp_path / "models").exists()


def test_vocabularies_and_training_records_are_written_with_the_model():
    """After training, so that a run failing in training leaves the earlier model's clusters.json and records."""
    for config in sorted(CONFIGS.parents[1].glob("*/configs/*train.json")):
        run = json.loads(config.read_text())["run"]
        trained = run.index("$@train#trainer.run()")
        for i, line in enumerate(run):
            if "vocabulary.save" in line or "record_training" in line:
                assert i > trained, (config, line)


def test_configs_pass_monai_property_checks(trained, tmp_path):
    assert _workflow(["train.json"], tmp_path).check_properties() == []
    root, _ = trained
    inference = ConfigWorkflow(
        config_file=str(CONFIGS / "inference.json"),
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=False,
        workflow_type="inference",
        bundle_root=str(root),
        csv_file=str(root / "data.csv"),
    )
    inference.initialize()
    assert inference.check_properties() == []


def test_every_config_parses():
    for name in ("train.json", "evaluate.json", "inference.json", "metadata.json"):
        json.loads((CONFIGS / name).read_text())
    assert torch.__version__


def test_variant_fixes_the_structure_over_config_kwargs():
    conventional = MixedEffectsMLP.from_variant(
        "conventional", in_features=2, out_channels=1, n_clusters=3, random_slopes="hidden"
    )
    assert not conventional.has_random_effects
    armed = MixedEffectsMLP.from_variant("armed", in_features=2, out_channels=1, n_clusters=3, random_slopes="both")
    assert set(armed.re_groups) == {"slope_input", "slope_hidden", "intercept"}


def test_training_resumes_from_the_last_epoch(tmp_path):
    _clustered_csv(tmp_path / "data.csv")
    data = {"csv_file": str(tmp_path / "data.csv"), "generate_default_data": False, "n_unseen_clusters": 1}
    first = _workflow(["train.json"], tmp_path, epochs=2, **data)
    first.run()
    assert (tmp_path / "models" / "resume_checkpoint_epoch=2.pt").is_file()
    resumed = _workflow(["train.json"], tmp_path, epochs=3, resume=True, **data)
    trainer = resumed.parser.get_parsed_content("train#trainer")
    epochs_run = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: epochs_run.append(engine.state.epoch))
    resumed.run()
    assert epochs_run == [3]  # epochs 1 and 2 came from the checkpoint
    # other settings would not continue the checkpoint's run (found by helper 54: a new learning rate reached only the
    # Z-predictor, a new batch size or KL weight applied from the next epoch on): refused before the first step
    changed = _workflow(["train.json"], tmp_path, epochs=4, resume=True, learning_rate=0.01, batch_size=16, **data)
    with pytest.raises(RuntimeError) as error:
        changed.run()
    assert re.search(r"batch_size: 32 in training, 16 now; learning_rate: 0.001 in training, 0.01 now\): the run would "
                     r"not continue it", str(error.value.__cause__)), error.value.__cause__
    assert sorted(p.name for p in (tmp_path / "models").glob("resume_*")) == [
        "resume_checkpoint_epoch=2.pt", "resume_checkpoint_epoch=3.pt"]  # fmt: skip


def test_resume_without_checkpoint_names_the_folder(tmp_path):
    workflow = _workflow(["train.json"], tmp_path, resume=True, epochs=1)
    with pytest.raises(RuntimeError) as error:
        workflow.run()
    assert isinstance(error.value.__cause__, FileNotFoundError)
    assert "no checkpoint 'resume_*epoch=N.pt' to resume from in" in str(error.value.__cause__)


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    _clustered_csv(tmp_path / "data.csv")
    data = {"csv_file": str(tmp_path / "data.csv"), "generate_default_data": False, "n_unseen_clusters": 1, "epochs": 4}
    full = _workflow(["train.json"], tmp_path / "full", **data)
    interrupt_before_epoch(full, None)  # builds the run's objects in the same order as below
    full.run()
    cut = _workflow(["train.json"], tmp_path / "cut", **data)
    interrupt_before_epoch(cut, 3)
    with pytest.raises(RuntimeError) as crash:
        cut.run()
    assert isinstance(crash.value.__cause__, Interrupted)
    assert sorted(p.name for p in (tmp_path / "cut" / "models").glob("resume_*")) == [
        "resume_checkpoint_epoch=1.pt",
        "resume_checkpoint_epoch=2.pt",
    ]
    _workflow(["train.json"], tmp_path / "cut", resume=True, **data).run()
    assert_same_training(
        tmp_path / "full",
        tmp_path / "cut",
        ["model.pt", "zpredictor.pt", "resume_checkpoint_epoch=4.pt"],
        ["metrics.json", "random_effects.json", "per_cluster_accuracy.json"],
    )
    # the resume checkpoints are pruned to the last two, across the two runs
    assert sorted(p.name for p in (tmp_path / "cut" / "models").glob("resume_*")) == [
        "resume_checkpoint_epoch=3.pt",
        "resume_checkpoint_epoch=4.pt",
    ]


def test_a_truncated_resume_checkpoint_falls_back_to_the_previous_epoch(tmp_path):
    _clustered_csv(tmp_path / "data.csv")
    data = {"csv_file": str(tmp_path / "data.csv"), "generate_default_data": False, "n_unseen_clusters": 1}
    _workflow(["train.json"], tmp_path, epochs=2, **data).run()
    newest = tmp_path / "models" / "resume_checkpoint_epoch=2.pt"
    newest.write_bytes(newest.read_bytes()[:64])  # as a crash of an older version or a full disk left it
    resumed = _workflow(["train.json"], tmp_path, epochs=3, resume=True, **data)
    trainer = resumed.parser.get_parsed_content("train#trainer")
    epochs_run = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: epochs_run.append(engine.state.epoch))
    with pytest.warns(UserWarning, match="resume_checkpoint_epoch=1.pt: skipped resume_checkpoint_epoch=2.pt is unread"):
        resumed.run()
    assert epochs_run == [2, 3]


def test_a_users_csv_file_is_used_without_generating_anything(tmp_path):
    _clustered_csv(tmp_path / "mine.csv")
    latin = (tmp_path / "mine.csv").read_text().replace("site", "h\u00f4pital")  # a latin-1 file, as csv_encoding says
    (tmp_path / "mine.csv").write_bytes(latin.encode("latin-1"))
    before = (tmp_path / "mine.csv").read_bytes()
    _workflow(["train.json"], tmp_path / "run", csv_file=str(tmp_path / "mine.csv"), epochs=1, n_unseen_clusters=1,
              csv_encoding="latin-1").run()  # fmt: skip
    vocabulary = json.loads((tmp_path / "run" / "models" / "clusters.json").read_text())["clusters"]
    assert set(vocabulary) < {f"h\u00f4pital{c}" for c in range(5)} and len(vocabulary) == 4
    assert not (tmp_path / "run" / "data").exists(), "no default data were generated"
    assert (tmp_path / "mine.csv").read_bytes() == before
    assert (tmp_path / "run" / "eval" / "metrics.json").is_file()


def test_network_scripts_with_ckpt_export_from_inference_json_alone(trained, tmp_path):
    root, _ = trained
    exported, export_root = export_network(CONFIGS, root / "models", tmp_path)
    network = _workflow(["inference.json"], export_root).parser.get_parsed_content("network_def")
    load_network_checkpoint(network, str(export_root / "models" / "model.pt"))
    x = torch.randn(16, 2)
    torch.testing.assert_close(exported(x), network.eval()(x))
    cluster = torch.tensor([0, 1, -1, 2] * 4)
    torch.testing.assert_close(exported(x, cluster), network(x, cluster))  # scripted: mixed effects too
