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
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "mixed_models.py"


def test_mixed_models_benchmark_writes_estimates_and_folds(tmp_path):
    rng = np.random.default_rng(0)
    subject = np.repeat(np.arange(12), 8)
    days = np.tile(np.arange(8.0), 12)
    y = 100 + 5 * days + rng.normal(0, 10, 12)[subject] + rng.normal(0, 2, 12)[subject] * days + rng.normal(0, 3, 96)
    csv = tmp_path / "visits.csv"
    pd.DataFrame({"y": y, "days": days, "subject": [f"0{s}" for s in subject]}).to_csv(csv, index=False)
    out = tmp_path / "out.json"
    command = [sys.executable, str(SCRIPT), "--csv", str(csv), "--formula", "y ~ days + (days | subject)",
               "--folds", "2", "--seed", "1", "--threads", "1", "--json", str(out)]
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1])}  # this checkout's package, whatever is installed
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=300, env=env)
    result = json.loads(out.read_text())
    assert result["n_rows"] == 96 and result["family"] == "gaussian"
    assert set(result["fixed_effects"]) == {"(Intercept)", "days"}
    assert abs(result["fixed_effects"]["days"] - 5) < 1.5
    groups = [(r["grp"], r["var1"], r["var2"]) for r in result["varcorr"]]
    assert groups == [("subject", "(Intercept)", None), ("subject", "days", None), ("subject", "(Intercept)", "days"),
                      ("Residual", None, None)]
    assert len(result["folds"]) == 2
    assert all(f["test_mse"] > 0 and f["test_deviance"] > 0 and f["train_seconds"] > 0 for f in result["folds"])
    assert result["test_mse_mean"] == np.mean([f["test_mse"] for f in result["folds"]])
    assert result["test_mse_mean"] < np.var(y)  # the random effects predict held-out visits of known subjects


def test_mixed_models_benchmark_refuses_options_that_would_fail_after_the_fit(tmp_path):
    """Checked before any fitting: results over the input CSV, a fold count the data cannot split, and lme4 compared
    with weights of another meaning."""
    csv = tmp_path / "data.csv"
    pd.DataFrame({"y": np.arange(6.0), "g": list("aabbcc"), "w": 1.0}).to_csv(csv, index=False)
    original = csv.read_bytes()
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1])}
    base = [sys.executable, str(SCRIPT), "--csv", str(csv), "--formula", "y ~ 1 + (1 | g)", "--threads", "1"]
    for extra, message in (
        (["--json", str(csv)], "the JSON output must be a .json file"),
        (["--json", str(tmp_path / "out.json"), "--folds", "1"], "--folds must be at least 2"),
        (["--json", str(tmp_path / "out.json"), "--folds", "7"], "more than the 6 rows"),
        (["--json", str(tmp_path / "out.json"), "--weights", "w", "--compare-lme4"], "precision weights"),
        (["--json", str(csv / "out.json")], "is a file, not a folder"),
    ):
        run = subprocess.run(base + extra, capture_output=True, text=True, timeout=120, env=env)
        assert run.returncode == 2 and message in run.stderr, (extra, run.stderr[-500:])
        assert csv.read_bytes() == original
    without_r = {**env, "PATH": str(tmp_path)}  # no Rscript: refused before the fit, not an empty lme4 column after
    run = subprocess.run(base + ["--json", str(tmp_path / "out.json"), "--compare-lme4"], capture_output=True,
                         text=True, timeout=120, env=without_r)  # fmt: skip
    assert run.returncode == 2 and "--compare-lme4 needs Rscript" in run.stderr, run.stderr[-500:]
    assert not (tmp_path / "out.json").exists()


def test_lme4_rows_of_split_and_nested_terms_are_matched():
    sys.path.insert(0, str(SCRIPT.parent))
    from mixed_models import _by_key

    lme4 = [{"grp": "Subject", "var1": "(Intercept)", "var2": None, "vcov": 584.3},
            {"grp": "Subject.1", "var1": "Days", "var2": None, "vcov": 33.6}]  # fmt: skip
    table = _by_key(lme4)
    assert table[("Subject", "Days", None)]["vcov"] == 33.6 and table[("Subject.1", "Days", None)]["vcov"] == 33.6
    assert table[("Subject", "(Intercept)", None)]["vcov"] == 584.3
    nested = _by_key([{"grp": "cask:batch", "var1": "(Intercept)", "var2": None, "vcov": 8.43}])
    assert nested[("batch:cask", "(Intercept)", None)]["vcov"] == 8.43
    deeper = _by_key([{"grp": "c:(b:a)", "var1": "(Intercept)", "var2": None, "vcov": 1.0}])
    assert deeper[("a:b:c", "(Intercept)", None)]["vcov"] == 1.0
