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
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

from monai_armed.apps.mixed_model import MixedModelFit, format_varcorr
from monai_armed.data.formula import build_design, parse_mixed_formula
from monai_armed.metrics.regression import regression_metrics
from monai_armed.utils import atomic_open, csv_cell, write_json

__all__ = ["formula_scores", "read_formula_csv", "split_rows", "write_formula_outputs"]

logger = logging.getLogger(__name__)


def read_formula_csv(path: str | os.PathLike | None, formula: str | None, encoding: str = "utf-8") -> pd.DataFrame:
    """Read a CSV for a mixed-model formula, every grouping column as text (``"01"`` and ``"1"`` stay two levels).

    Example::

        frame = read_formula_csv("sleepstudy.csv", "Reaction ~ Days + (Days | Subject)")
    """
    if path is None or formula is None:
        raise ValueError(
            "a formula model needs a CSV and a formula: pass --csv_file FILE and --formula 'y ~ x + (1 | group)'."
        )
    groups = {c for term in parse_mixed_formula(formula).random for c in term.group_columns}
    try:
        frame = pd.read_csv(path, dtype={c: str for c in groups}, encoding=encoding)
    except FileNotFoundError:
        raise FileNotFoundError(f"CSV file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not valid {encoding} text ({e}); pass the file's encoding.") from None
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path} is empty: expected a header line and one row per observation.") from None
    if frame.empty:
        raise ValueError(f"{path} has a header but no rows: columns {list(frame.columns)[:30]}.")
    return frame


def split_rows(frame: pd.DataFrame, test_fraction: float, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """A random train / test split of the rows (``test_fraction=0``: every row trains, no test set).

    Example::

        train, test = split_rows(frame, 0.2, seed=0)
    """
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}.")
    if test_fraction == 0:
        return frame, None
    train, test = train_test_split(frame, test_size=test_fraction, random_state=seed)
    return train, test


def formula_scores(
    fit: MixedModelFit, frame: pd.DataFrame, random_effects: bool = True, trials: str | None = None
) -> dict:
    """MSE, MAE, R^2 (response scale) and mean unit deviance of a fitted model on rows of new data (for a binary
    outcome also the accuracy at 0.5 and the AUROC).

    Levels the fit did not see contribute nothing for their factor (fixed effects for it).

    Example::

        formula_scores(fit, test_frame)["mse"]
    """
    design = build_design(None, frame, like=fit.design)
    n = frame[trials].to_numpy(float) if trials else None
    mean = fit.predict(design, random_effects=random_effects) * (n if n is not None else 1.0)
    eta = torch.as_tensor(fit.linear_predictor(design, random_effects=random_effects))  # the data's units
    deviance = fit.family.unit_deviance(eta, torch.as_tensor(np.array(design.y)),
                                        None if n is None else torch.as_tensor(n))
    scores = regression_metrics(torch.as_tensor(mean), torch.as_tensor(np.array(design.y)))  # a copy: y is read-only
    if fit.family.name == "bernoulli":  # a binary outcome: also how well the probabilities rank and classify
        labels = np.array(design.y)
        scores["accuracy"] = float(((mean > 0.5) == (labels > 0.5)).mean())
        scores["auroc"] = float(roc_auc_score(labels, mean)) if len(np.unique(labels)) == 2 else None
    return {**scores, "deviance": float(deviance.mean()), "rows": int(len(frame))}


def write_formula_outputs(
    fit: MixedModelFit,
    output_dir: str | os.PathLike,
    train: pd.DataFrame | None = None,
    test: pd.DataFrame | None = None,
    trials: str | None = None,
) -> dict:
    """Write a fitted formula model's estimates, checkpoint, test scores and predictions; returns the metrics.

    Files (each written atomically): ``fixed_effects.json``, ``varcorr.json`` and ``varcorr.txt`` (lme4's
    ``VarCorr`` rows and table), ``model.pt`` (:meth:`MixedModelFit.state_dict`: the network, the family and the
    response scale), ``vocabularies.json`` (the levels of every
    grouping factor, to map new data), ``metrics.json`` (training and test MSE, MAE, R^2 and mean deviance, with and
    without the random effects) and ``predictions.csv`` (the test rows' predicted means; without ``test`` an earlier
    run's file is left and a warning says so). The test and training rows are scored before anything is written.

    Example::

        fit = fit_formula(formula, train_frame, "gaussian")
        write_formula_outputs(fit, "eval", train=train_frame, test=test_frame)
    """
    out = Path(output_dir)
    rows = fit.variance_components()
    metrics: dict = {
        "formula": str(fit.design.formula),
        "family": fit.family.name,
        "fit_seconds": fit.fit_seconds,
        "estimation": fit.estimation,
        "notes": list(fit.notes),
    }
    if train is not None:
        metrics["train"] = formula_scores(fit, train, True, trials)
    if test is not None:
        metrics["test"] = formula_scores(fit, test, True, trials)
        metrics["test_fixed_effects_only"] = formula_scores(fit, test, False, trials)
    out.mkdir(parents=True, exist_ok=True)  # after scoring, whose errors would leave an empty folder
    if test is None and (out / "predictions.csv").exists():
        logger.warning("%s is from an earlier run: this one has no test rows to predict.", out / "predictions.csv")
    write_json(fit.fixed_effects(), out / "fixed_effects.json")
    write_json(rows, out / "varcorr.json")
    with atomic_open(out / "varcorr.txt") as f:
        f.write(format_varcorr(rows) + "\n")
    with atomic_open(out / "model.pt", mode="wb") as f:
        torch.save(fit.state_dict(), f)
    write_json(fit.design.vocabularies, out / "vocabularies.json")
    write_json(metrics, out / "metrics.json")
    if test is not None:
        predicted = fit.predict(build_design(None, test, like=fit.design))
        with atomic_open(out / "predictions.csv", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["row", fit.design.response, "predicted"])
            for index, y, p in zip(test.index, test[fit.design.response], predicted):
                writer.writerow([csv_cell(index), float(y), float(p)])
    logger.info("formula model written to %s (test MSE %s)", out, metrics.get("test", {}).get("mse"))
    return metrics
