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
"""
The random-intercept simulation of LMMNN (Simchoni & Rosset, "Using Random Effects to Account for High-Cardinality
Categorical Features and Repeated Measures in Deep Neural Networks", NeurIPS 2021), fitted with ``fit_formula``.

    python benchmarks/lmmnn_simulation.py --json benchmarks/out/lmmnn_simulation.json
    python benchmarks/lmmnn_simulation.py --json /tmp/lmmnn_smoke.json --n 3000 --reps 1 --q 100 --sigma2-b 1 \\
        --epochs 2 --no-results-md

Data (re-implemented from the paper's description): ``N`` rows, 10 features ``X ~ U(-1, 1)``, ``f(X) = (X beta)
cos(X beta) + 2 X1 X2 + 1`` with ``beta`` all ones, ``y = f(X) + b[g] + e`` with ``e ~ N(0, 1)`` and ``b ~ N(0,
sigma2_b)`` over ``q`` levels whose sizes are multinomial with probabilities proportional to one ``Poisson(3) + 1``
draw per level; a random 80/20 train/test split. Repetition ``r`` draws its data with ``numpy`` seed ``r`` and fits
with seed ``r``.

Models: the mixed model ``y ~ x1 + ... + x10 + (1 | g)`` with an MLP fixed part (LMMNN's 100-50-25-12 ReLU network by
default) fitted by ``fit_formula(..., optimizer="adam")``, i.e. mini-batch maximisation of the ELBO with the batch
estimate of the KL and LazyAdam, and tested with ``fit.predict`` (the posterior mean of each seen level's intercept;
fixed part only for a level the training rows lack); and the cluster-ignoring network, the same MLP fitted the same way
from ``y ~ x1 + ... + x10`` (no random term; predicted with ``random_effects=False``).

Reported per cell (q, sigma2_b): test MSE of both models and the estimated ``sigma2_b`` (mean and 95% t-interval over
repetitions, every repetition listed), beside LMMNN's published test MSE and its cluster-ignoring network's (Table 1
of the paper; q = 1000 has none). ``realised_sigma2_b`` is the sample variance of the drawn intercepts of the levels
in the training rows, the most an estimator can recover; with q levels its relative sampling s.d. around ``sigma2_b`` is
about ``sqrt(2 / q)`` (14% at q = 100, so a mean over 5 repetitions still has about 6%).

Training settings (defaults: 80 epochs, batch 2048, lr 0.01): ``fit_mixed_model`` uses one learning rate for the MLP
and the random-effects table, and LazyAdam moves a level's intercept only in steps whose batch holds one of its rows,
so a level gets about as many updates per epoch as it has training rows (about 8 at q = 10^4) whatever the batch size.
The MLP needs a small learning rate (about 0.01; at 0.03 its error on f grew six-fold), so the intercepts need many
epochs, and large batches buy those epochs cheaply (on a CPU a step of 2048 rows cost about 1.5 times one of 512).

Targets: test MSE at or below LMMNN's published figure in every cell that has one; estimated sigma2_b within 10% of
the truth.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from cli import json_output  # noqa: E402
from results_md import replace_section  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from monai_armed.apps import fit_formula
from monai_armed.metrics import mean_ci95
from monai_armed.utils import write_json

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "lmmnn-simulation"
N_FEATURES = 10
FEATURES = [f"x{k}" for k in range(1, N_FEATURES + 1)]
MIXED_FORMULA = "y ~ " + " + ".join(FEATURES) + " + (1 | g)"
IGNORE_FORMULA = "y ~ " + " + ".join(FEATURES)
#: LMMNN's published test MSE (Simchoni & Rosset 2021, Table 1), {(sigma2_b, q): (LMMNN, cluster-ignoring network)}
PUBLISHED = {
    (0.1, 100): (1.095, 1.239),
    (0.1, 10000): (1.180, 1.220),
    (1.0, 100): (1.096, 2.094),
    (1.0, 10000): (1.238, 2.152),
    (10.0, 100): (1.106, 10.753),
    (10.0, 10000): (1.294, 11.235),
}
SIGMA2_TOLERANCE = 0.10


def log(message: str) -> None:
    print(message, flush=True)


def simulate(n: int, q: int, sigma2_b: float, seed: int, test_fraction: float = 0.2) -> dict:
    """One data set of the simulation: train and test frames, the drawn intercepts and the realised variance."""
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1.0, 1.0, size=(n, N_FEATURES))
    linear = X.sum(axis=1)  # X beta with beta = 1
    f = linear * np.cos(linear) + 2.0 * X[:, 0] * X[:, 1] + 1.0
    weights = rng.poisson(3.0, size=q) + 1.0
    sizes = rng.multinomial(n, weights / weights.sum())
    g = np.repeat(np.arange(q), sizes)
    b = rng.normal(0.0, np.sqrt(sigma2_b), size=q)
    y = f + b[g] + rng.normal(0.0, 1.0, size=n)
    frame = pd.DataFrame(X, columns=FEATURES)
    frame["g"], frame["y"] = g, y
    order = rng.permutation(n)
    n_test = int(round(test_fraction * n))
    test, train = frame.iloc[order[:n_test]], frame.iloc[order[n_test:]]
    train_levels = np.unique(train["g"].to_numpy())
    return {
        "train": train.reset_index(drop=True),
        "test": test.reset_index(drop=True),
        "realised_sigma2_b": float(np.var(b[train_levels], ddof=1)),
        "train_levels": int(train_levels.size),
        "unseen_test_rows": int((~np.isin(test["g"].to_numpy(), train_levels)).sum()),
    }


def intercept_variance(rows: Sequence[dict], group: str = "g") -> float:
    """The estimated random-intercept variance of ``group`` from ``variance_components()`` rows."""
    for row in rows:
        if row["grp"] == group and row["var1"] == "(Intercept)" and row["var2"] is None:
            return float(row["vcov"])
    raise KeyError(f"no (Intercept) variance of {group!r} in {rows}.")


def residual_variance(rows: Sequence[dict]) -> float:
    return next(float(r["vcov"]) for r in rows if r["grp"] == "Residual")


def run_rep(q: int, sigma2_b: float, rep: int, args: argparse.Namespace) -> dict:
    data = simulate(args.n, q, sigma2_b, seed=rep)
    options = {"hidden_channels": args.hidden, "optimizer": "adam", "epochs": args.epochs,
               "batch_size": args.batch_size, "lr": args.lr, "seed": rep}
    y_test = data["test"]["y"].to_numpy()

    mixed = fit_formula(MIXED_FORMULA, data["train"], "gaussian", **options)
    mse = float(np.mean((y_test - mixed.predict(data["test"])) ** 2))
    varcorr = mixed.variance_components()
    entry = {
        "rep": rep, "data_seed": rep, "model_seed": rep,
        "n_train": len(data["train"]), "n_test": len(data["test"]),
        "train_levels": data["train_levels"], "unseen_test_rows": data["unseen_test_rows"],
        "test_mse": mse,
        "sigma2_b_hat": intercept_variance(varcorr),
        "sigma2_e_hat": residual_variance(varcorr),
        "realised_sigma2_b": data["realised_sigma2_b"],
        "fit_seconds": mixed.fit_seconds,
        "adam_steps": mixed.iterations,
    }
    if not args.no_baseline:
        # no random term: fit_mixed_model trains the same MLP alone; predict without random effects (there are none)
        ignore = fit_formula(IGNORE_FORMULA, data["train"], "gaussian", **options)
        entry["test_mse_ignore"] = float(np.mean((y_test - ignore.predict(data["test"], random_effects=False)) ** 2))
        entry["fit_seconds_ignore"] = ignore.fit_seconds
    return entry


def summary(values: Sequence[float]) -> dict:
    mean, ci = mean_ci95(values)
    return {"mean": mean, "ci95": ci}


def run_cell(q: int, sigma2_b: float, args: argparse.Namespace) -> dict:
    reps = []
    for rep in range(args.reps):
        reps.append(run_rep(q, sigma2_b, rep, args))
        r = reps[-1]
        ignore = f", ignoring clusters {r['test_mse_ignore']:.4f}" if "test_mse_ignore" in r else ""
        log(f"q={q} sigma2_b={sigma2_b:g} rep {rep}: test MSE {r['test_mse']:.4f}{ignore}; sigma2_b estimate "
            f"{r['sigma2_b_hat']:.4f} (realised {r['realised_sigma2_b']:.4f}), residual {r['sigma2_e_hat']:.4f}; "
            f"fit {r['fit_seconds']:.1f} s")
    cell: dict = {
        "q": q,
        "sigma2_b": sigma2_b,
        "test_mse": summary([r["test_mse"] for r in reps]),
        "sigma2_b_hat": summary([r["sigma2_b_hat"] for r in reps]),
        "sigma2_b_relative_error": float(np.mean([r["sigma2_b_hat"] for r in reps]) / sigma2_b - 1.0),
        "sigma2_e_hat": summary([r["sigma2_e_hat"] for r in reps]),
        "realised_sigma2_b": summary([r["realised_sigma2_b"] for r in reps]),
        "fit_seconds": float(np.mean([r["fit_seconds"] for r in reps])),
        "reps": reps,
    }
    if not args.no_baseline:
        cell["test_mse_ignore"] = summary([r["test_mse_ignore"] for r in reps])
    published = PUBLISHED.get((float(sigma2_b), q))
    if published is not None:
        cell["published"] = {"lmmnn_test_mse": published[0], "ignore_test_mse": published[1]}
        cell["mse_target_met"] = cell["test_mse"]["mean"] <= published[0]
    cell["sigma2_b_target_met"] = abs(cell["sigma2_b_relative_error"]) <= SIGMA2_TOLERANCE
    return cell


def _ci(entry: dict, digits: int = 3) -> str:
    if entry["ci95"] is None:
        return f"{entry['mean']:.{digits}f}"
    low, high = entry["ci95"]
    return f"{entry['mean']:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def render_section(results: dict) -> str:
    proto, machine = results["protocol"], results["machine"]
    lines = [
        "## LMMNN simulation: random intercepts with q levels (Simchoni & Rosset, NeurIPS 2021)",
        "",
        f"`{proto['command']}` — {proto['date']}, {machine['cpu_count']} CPUs, torch {machine['torch']}, "
        f"{machine['threads']} thread(s).",
        "",
        f"N = {proto['n']:,} rows, 10 features U(-1, 1), y = (Xb) cos(Xb) + 2 x1 x2 + 1 + b[g] + e, e ~ N(0, 1), "
        "level sizes multinomial with Poisson(3) + 1 weights, 80/20 split; "
        f"{proto['reps']} repetitions (data and model seed = repetition). `fit_formula(\"{MIXED_FORMULA}\")` with an "
        f"MLP fixed part {proto['hidden']}, mini-batch ELBO (batch KL, LazyAdam), {proto['epochs']} epochs, batch "
        f"{proto['batch_size']}, lr {proto['lr']}; 'ignoring' is the same MLP without the random term. Test MSE and "
        "estimated sigma2_b: mean [95% t-interval] over repetitions; LMMNN's figures are the paper's (none for "
        "q = 1000). 'realised' is the sample variance of the drawn intercepts.",
        "",
        "| sigma2_b | q | test MSE | LMMNN (paper) | ignoring clusters | ignoring (paper) | sigma2_b estimate | "
        "realised | fit s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in results["cells"]:
        published = cell.get("published", {})
        lines.append(
            f"| {cell['sigma2_b']:g} | {cell['q']:,} | {_ci(cell['test_mse'])} | "
            f"{published.get('lmmnn_test_mse', '-')} | "
            f"{_ci(cell['test_mse_ignore']) if 'test_mse_ignore' in cell else '-'} | "
            f"{published.get('ignore_test_mse', '-')} | {_ci(cell['sigma2_b_hat'])} | "
            f"{cell['realised_sigma2_b']['mean']:.3f} | {cell['fit_seconds']:.1f} |"
        )
    targets = results["targets"]
    lines += [
        "",
        f"Targets: test MSE at or below LMMNN's in every published cell: "
        f"{'met' if targets['mse_all_met'] else 'not met'} ({targets['mse_cells_met']} of "
        f"{targets['mse_cells']}); sigma2_b within {SIGMA2_TOLERANCE:.0%} of the truth (mean over repetitions): "
        f"{'met' if targets['sigma2_b_all_met'] else 'not met'} ({targets['sigma2_b_cells_met']} of "
        f"{targets['cells']} cells).",
    ]
    return "\n".join(lines)


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=json_output, required=True, help="output JSON path")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--q", default="100,1000,10000", type=lambda t: [int(float(v)) for v in _floats(t)])
    parser.add_argument("--sigma2-b", default="0.1,1,10", type=_floats)
    parser.add_argument("--n", type=int, default=100_000, help="rows before the 80/20 split")
    parser.add_argument("--hidden", default="100,50,25,12", type=lambda t: [int(v) for v in t.split(",") if v],
                        help="hidden widths of the MLP fixed part (LMMNN: 100,50,25,12)")
    parser.add_argument("--epochs", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--no-baseline", action="store_true", help="skip the cluster-ignoring network")
    parser.add_argument("--no-results-md", action="store_true", help="do not rewrite the RESULTS.md section")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.n < 10 or min(args.q) < 2 or min(args.sigma2_b) <= 0:
        parser.error("--reps >= 1, --n >= 10, every q >= 2 and every sigma2_b > 0 are needed.")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    cells = [run_cell(q, s2, args) for s2 in args.sigma2_b for q in args.q]
    published = [c for c in cells if "mse_target_met" in c]
    results = {
        "cells": cells,
        "targets": {
            "mse_cells": len(published),
            "mse_cells_met": sum(c["mse_target_met"] for c in published),
            "mse_all_met": bool(published) and all(c["mse_target_met"] for c in published),
            "sigma2_b_tolerance": SIGMA2_TOLERANCE,
            "cells": len(cells),
            "sigma2_b_cells_met": sum(c["sigma2_b_target_met"] for c in cells),
            "sigma2_b_all_met": all(c["sigma2_b_target_met"] for c in cells),
        },
        "published": {f"sigma2_b={s2:g},q={q}": {"lmmnn": v[0], "ignore": v[1]} for (s2, q), v in PUBLISHED.items()},
        "protocol": {
            "command": shlex.join(["python", "benchmarks/lmmnn_simulation.py", *argv]),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "n": args.n, "reps": args.reps, "q": args.q, "sigma2_b": args.sigma2_b, "hidden": args.hidden,
            "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
            "mixed_formula": MIXED_FORMULA, "ignore_formula": IGNORE_FORMULA,
            "seeds": {"data": list(range(args.reps)), "model": list(range(args.reps))},
            "total_wall_seconds": None,
        },
        "machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    results["protocol"]["total_wall_seconds"] = time.perf_counter() - start
    write_json(results, args.json)
    if not args.no_results_md:
        replace_section(RESULTS_MD, SECTION, render_section(results))
    log(render_section(results))
    return results


if __name__ == "__main__":
    main()
