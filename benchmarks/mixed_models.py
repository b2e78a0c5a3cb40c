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
"""Fit an lme4-style mixed model to a CSV with monai_armed, optionally cross-validated and compared with lme4.

    python benchmarks/mixed_models.py --csv sleepstudy.csv --formula "Reaction ~ Days + (Days | Subject)" \\
        --json benchmarks/out/sleepstudy.json --compare-lme4

Without ``--folds`` the model is fitted to every row; with ``--folds K`` also K-fold cross-validated
(``sklearn.model_selection.KFold(K, shuffle=True, random_state=seed)``), each test fold predicted with the training
levels' random effects (fixed effects for levels a fold did not train on). The JSON holds ``formula``, ``family``,
``n_rows``, ``fit_seconds``, ``fixed_effects`` (linear fixed part; the intercept as ``(Intercept)``), ``varcorr`` (lme4
``as.data.frame(VarCorr)`` rows, residual included) and with folds ``folds`` (``test_mse``, ``test_deviance``,
``train_seconds``) and ``test_mse_mean``. ``--compare-lme4`` adds lme4's ML and REML fits through ``Rscript`` when R
and lme4 are installed (``apt-get install r-cran-lme4``). Grouping columns are read as text, so ids like ``01`` and
``1`` stay distinct.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import KFold

from cli import json_output  # noqa: E402
from results_md import replace_section  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from monai_armed.apps import fit_formula, format_varcorr, formula_scores, read_formula_csv
from monai_armed.losses import FAMILIES
from monai_armed.utils import write_json


RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"


R_SCRIPT = """
suppressMessages(library(lme4))
args <- commandArgs(trailingOnly = TRUE)
d <- read.csv(args[1], colClasses = "character")
for (col in strsplit(args[5], ",")[[1]]) if (nchar(col)) d[[col]] <- as.numeric(d[[col]])
family <- args[3]
for (reml in c(FALSE, TRUE)) {
  if (family == "gaussian") {
    if (!reml) t0 <- Sys.time()
    fit <- lmer(as.formula(args[2]), data = d, REML = reml)
  } else {
    if (reml) next
    fam <- switch(family, bernoulli = binomial(), binomial = binomial(), poisson = poisson())
    if (family == "binomial") {
      f <- as.formula(args[2]); resp <- all.vars(f)[1]
      d$.p <- d[[resp]] / d[[args[4]]]
      f <- update(f, .p ~ .)
      fit <- glmer(f, data = d, family = fam, weights = d[[args[4]]])
    } else fit <- glmer(as.formula(args[2]), data = d, family = fam)
  }
  tag <- if (reml) "reml" else "ml"
  write.csv(data.frame(name = names(fixef(fit)), estimate = unname(fixef(fit))), paste0(args[6], "_", tag, "_fixef.csv"),
            row.names = FALSE)
  write.csv(as.data.frame(VarCorr(fit)), paste0(args[6], "_", tag, "_varcorr.csv"), row.names = FALSE)
}
"""


def lme4_reference(csv: str, formula: str, family: str, trials: str | None, numeric: Sequence[str]) -> dict | None:
    """lme4's ML (and, Gaussian, REML) fixed effects and VarCorr rows, or ``None`` without ``Rscript``."""
    if shutil.which("Rscript") is None:
        print("Rscript not found: no lme4 comparison (apt-get install r-cran-lme4)", file=sys.stderr)
        return None
    with tempfile.TemporaryDirectory() as tmp:
        script, prefix = Path(tmp) / "fit.R", str(Path(tmp) / "out")
        script.write_text(R_SCRIPT)
        start = time.perf_counter()
        r_formula = re.sub(r"\bC\(", "factor(", formula)  # formulaic's categorical marker is R's factor()
        subprocess.run(
            ["Rscript", str(script), csv, r_formula, family, trials or "", ",".join(numeric), prefix], check=True
        )
        seconds = time.perf_counter() - start
        result: dict = {"seconds_including_r_start": seconds}
        for tag in ("ml", "reml"):
            fixef_path = Path(f"{prefix}_{tag}_fixef.csv")
            if not fixef_path.exists():
                continue
            fixef = pd.read_csv(fixef_path)
            varcorr = pd.read_csv(f"{prefix}_{tag}_varcorr.csv").replace({np.nan: None})
            result[tag] = {
                "fixed_effects": dict(zip(fixef["name"], fixef["estimate"].astype(float))),
                "varcorr": [
                    {"grp": r["grp"], "var1": r["var1"], "var2": r["var2"], "vcov": float(r["vcov"]),
                     "sdcor": float(r["sdcor"])}
                    for r in varcorr.to_dict("records")
                ],
            }
    return result


def _key(row: dict) -> tuple:
    return row["grp"], row["var1"], row["var2"]


def _by_key(rows: Sequence[dict]) -> dict:
    """lme4's VarCorr rows by (group, var1, var2), also under this package's group names where lme4's differ: lme4
    splits a ``||`` term into groups ``g``, ``g.1``, ... with one effect each (found under ``g`` too, where that key
    is not taken) and names the inner factors of ``(1 | a/b/c)`` ``b:a`` and ``c:(b:a)`` (found under ``a:b`` and
    ``a:b:c``)."""
    table = {_key(r): r for r in rows}
    for row in rows:
        group = re.sub(r"\.\d+$", "", row["grp"])
        outer_first = ":".join(reversed(group.replace("(", "").replace(")", "").split(":")))
        for name in (group, outer_first):
            table.setdefault((name, row["var1"], row["var2"]), row)
    return table


def _lme4_name(name: str) -> str:
    """lme4's name of a formulaic column: ``C(period)[T.2]`` -> ``factor(period)2``."""
    return re.sub(r"^C\((\w+)\)\[T\.(.+)\]$", r"factor(\1)\2", name)


def render_section(result: dict) -> str:
    """A RESULTS.md section: the estimates beside lme4's ML and REML ones when they were computed."""
    lme4 = result.get("lme4") or {}
    ml, reml = lme4.get("ml", {}), lme4.get("reml", {})
    lines = [
        f"## Mixed model: `{result['formula']}` ({result['family']}, {result['n_rows']} rows)",
        "",
        f"`{result['command']}` — {result['date']}, {result['threads']} threads. monai_armed: {result['estimation']}; "
        "lme4 ML is `REML = FALSE` (Laplace for GLMMs), REML lme4's default.",
        "",
        "| estimate | monai_armed | lme4 ML | lme4 REML |",
        "|---|---|---|---|",
    ]

    def cell(table: dict, key) -> str:
        return f"{table[key]:.4g}" if key in table else ""

    ml_fixed, reml_fixed = ml.get("fixed_effects", {}), reml.get("fixed_effects", {})
    for name, value in result["fixed_effects"].items():
        key = _lme4_name(name)
        lines.append(f"| {name} | {value:.4g} | {cell(ml_fixed, key)} | {cell(reml_fixed, key)} |")
    ml_vc, reml_vc = _by_key(ml.get("varcorr", [])), _by_key(reml.get("varcorr", []))
    for row in result["varcorr"]:
        what = "Cor" if row["var2"] else "Var"
        field = "sdcor" if row["var2"] else "vcov"
        names = ", ".join(n for n in (row["var1"], row["var2"]) if n)
        label = f"{what}({row['grp']}{': ' + names if names else ''})"
        others = [f"{t[_key(row)][field]:.4g}" if _key(row) in t else "" for t in (ml_vc, reml_vc)]
        lines.append(f"| {label} | {row[field]:.4g} | {others[0]} | {others[1]} |")
    folds = f"; {len(result['folds'])}-fold test MSE {result['test_mse_mean']:.4g}" if "test_mse_mean" in result else ""
    lines.append(f"\nFit time {result['fit_seconds']:.2f} s{folds}.")
    if "error" in lme4:
        lines.append(f"\nlme4 was asked for but failed ({lme4['error']}): its columns are empty.")
    elif "lme4" in result and not lme4:
        lines.append("\nlme4 was asked for but Rscript was not found: its columns are empty.")
    return "\n".join(lines)


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, before any fitting, options that would fail or mislead at the end of the run."""
    if Path(args.json).resolve() == Path(args.csv).resolve():
        parser.error(f"--json {args.json} is the input CSV: the results would replace the data.")
    if Path(args.json).is_dir():
        parser.error(f"--json {args.json} is a folder; give the JSON file's path.")
    for parent in Path(args.json).resolve().parents:
        if parent.exists():
            if not parent.is_dir():
                parser.error(f"--json {args.json}: {parent} is a file, not a folder.")
            break
    if args.folds is not None and args.folds < 2:
        parser.error(f"--folds must be at least 2, got {args.folds}.")
    # the option conflict first: it holds whether or not R is installed
    if args.compare_lme4 and args.weights:
        parser.error(
            "--compare-lme4 with --weights: these weights multiply each row's log-likelihood (frequency weights), "
            "lme4's divide the residual variance (precision weights), so the two fits would not be comparable."
        )
    if args.compare_lme4 and shutil.which("Rscript") is None:
        parser.error("--compare-lme4 needs Rscript with lme4 (apt-get install r-cran-lme4), which is not installed.")


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", required=True)
    parser.add_argument("--formula", required=True)
    parser.add_argument("--family", default="gaussian", choices=sorted(set(FAMILIES) - {"categorical"}))
    parser.add_argument("--trials", default=None, help="column with the number of trials (binomial)")
    parser.add_argument("--weights", default=None, help="column of row weights")
    parser.add_argument("--folds", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden", default="", type=lambda t: [int(v) for v in t.split(",") if v],
                        help="hidden widths of an MLP fixed part, e.g. 16,8 (default: linear)")
    parser.add_argument("--optimizer", default="auto", choices=["auto", "lbfgs", "adam"])
    parser.add_argument("--reml", action="store_true", help="REML (Gaussian, linear fixed part) instead of ML")
    parser.add_argument("--adversary", default=None, help="grouping factor for ARMED's adversary (needs --hidden)")
    parser.add_argument("--adv-weight", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compare-lme4", action="store_true")
    parser.add_argument("--json", type=json_output, required=True)
    parser.add_argument("--section", default=None, help="also write this section of benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    torch.set_num_threads(args.threads)
    frame = read_formula_csv(args.csv, args.formula)
    if args.folds is not None and args.folds > len(frame):
        parser.error(f"--folds {args.folds} is more than the {len(frame)} rows of {args.csv}.")
    options = {"trials": args.trials, "weights": args.weights, "source": args.csv, "hidden_channels": args.hidden,
               "optimizer": args.optimizer, "epochs": args.epochs, "seed": args.seed, "reml": args.reml,
               "adversary": args.adversary, "adv_weight": args.adv_weight}

    fit = fit_formula(args.formula, frame, args.family, **options)
    result = {
        "formula": args.formula,
        "family": args.family,
        "n_rows": int(len(frame)),
        "fit_seconds": fit.fit_seconds,
        "estimation": fit.estimation,
        "fixed_effects": fit.fixed_effects(),
        "varcorr": fit.variance_components(),
        "threads": torch.get_num_threads(),
        "command": shlex.join(["python", "benchmarks/mixed_models.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    print(f"fixed effects: {json.dumps(result['fixed_effects'])}\n{format_varcorr(result['varcorr'])}")
    print(f"fit in {fit.fit_seconds:.2f} s on {len(frame)} rows")
    if args.folds:
        result["folds"] = []
        for train_rows, test_rows in KFold(args.folds, shuffle=True, random_state=args.seed).split(frame):
            fold_fit = fit_formula(args.formula, frame.iloc[train_rows], args.family, **options)
            scores = formula_scores(fold_fit, frame.iloc[test_rows], trials=args.trials)
            result["folds"].append(
                {"test_mse": scores["mse"], "test_deviance": scores["deviance"], "train_seconds": fold_fit.fit_seconds}
            )
        result["test_mse_mean"] = float(np.mean([f["test_mse"] for f in result["folds"]]))
        print(f"{args.folds}-fold test MSE {result['test_mse_mean']:.4f}")
    if args.compare_lme4:
        numeric = [c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c])]
        try:
            result["lme4"] = lme4_reference(args.csv, args.formula, args.family, args.trials, numeric)
        except subprocess.CalledProcessError as error:  # keep the fit: lme4's failure is reported beside it
            print(f"lme4 failed (exit status {error.returncode}); the fit is saved without it", file=sys.stderr)
            result["lme4"] = {"error": f"Rscript exited with status {error.returncode}"}
    result["date"] = datetime.datetime.now().isoformat(timespec="seconds")
    if args.section:
        replace_section(RESULTS_MD, args.section, render_section(result))
    write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
