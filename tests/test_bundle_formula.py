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
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from monai.bundle import ConfigWorkflow

CONFIGS = Path(__file__).resolve().parents[1] / "bundles" / "armed_spirals" / "configs"


def _run(root: Path, **override) -> ConfigWorkflow:
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "formula.json"),
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        workflow_type="train",
        bundle_root=str(root),
        **override,
    )
    workflow.initialize()
    workflow.run()
    return workflow


def _visits(path: Path) -> pd.DataFrame:
    """Repeated measures: subjects (crossed with sites) with their own intercept and slope over visits."""
    rng = np.random.default_rng(0)
    subject = np.repeat(np.arange(30), 8)
    visit = np.tile(np.arange(8.0), 30)
    site = rng.integers(0, 4, 30)[subject]
    y = (50 + 3 * visit + rng.normal(0, 6, 30)[subject] + rng.normal(0, 1, 30)[subject] * visit
         + np.array([-4.0, 0.0, 2.0, 5.0])[site] + rng.normal(0, 1.5, subject.size))
    frame = pd.DataFrame({"score": y, "visit": visit, "subject": [f"s{k:02d}" for k in subject],
                          "site": [f"0{k}" for k in site]})
    frame.to_csv(path, index=False)
    return frame


def test_formula_config_fits_a_users_csv(tmp_path):
    csv = tmp_path / "visits.csv"
    frame = _visits(csv)
    _run(tmp_path / "bundle", csv_file=str(csv), formula="score ~ visit + (1 + visit | subject) + (1 | site)",
         family="gaussian", hidden_channels=[])
    out = tmp_path / "bundle" / "formula"
    assert {p.name for p in out.iterdir()} == {"fixed_effects.json", "varcorr.json", "varcorr.txt", "model.pt",
                                               "vocabularies.json", "metrics.json", "predictions.csv"}
    fixed = json.loads((out / "fixed_effects.json").read_text())
    assert fixed["visit"] == pytest.approx(3.0, abs=0.6)
    groups = {(r["grp"], r["var1"], r["var2"]) for r in json.loads((out / "varcorr.json").read_text())}
    assert ("subject", "(Intercept)", "visit") in groups and ("site", "(Intercept)", None) in groups
    assert json.loads((out / "vocabularies.json").read_text())["site"] == ["00", "01", "02", "03"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["rows"] == 48 and metrics["train"]["rows"] == 192
    # crossed subject and site: the exact marginal likelihood, not a per-level approximation
    assert metrics["estimation"].startswith("maximum likelihood: exact marginal likelihood") and metrics["notes"] == []
    # the subjects' random effects predict their held-out visits far better than the fixed effects alone
    assert metrics["test"]["mse"] < 0.3 * metrics["test_fixed_effects_only"]["mse"]
    assert metrics["test"]["mse"] < 0.2 * frame["score"].var()
    state = torch.load(out / "model.pt", weights_only=True)
    assert set(state) == {"network", "family", "response_scale"} and "log_scale" in state["family"]
    predictions = pd.read_csv(out / "predictions.csv")
    assert len(predictions) == 48 and list(predictions.columns) == ["row", "score", "predicted"]


def _chain(error: BaseException) -> str:
    """The messages of an exception and of its causes (MONAI wraps a config expression's error)."""
    messages = []
    while error is not None:
        messages.append(str(error))
        error = error.__cause__ or error.__context__
    return "\n".join(messages)


def test_formula_config_refuses_a_missing_column_before_fitting(tmp_path):
    csv = tmp_path / "visits.csv"
    _visits(csv)
    with pytest.raises(RuntimeError) as error:
        _run(tmp_path / "bundle", csv_file=str(csv), formula="score ~ vist + (1 | subject)", family="gaussian")
    assert "column 'vist' of term 'vist' is not in" in _chain(error.value) and "visits.csv" in _chain(error.value)
    assert not (tmp_path / "bundle" / "formula").exists()
    with pytest.raises(RuntimeError) as error:
        _run(tmp_path / "bundle", generate_default_data=False)
    assert "pass --csv_file FILE and --formula" in _chain(error.value)
