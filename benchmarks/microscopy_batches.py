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
"""Multi-batch microscopy benchmark: conventional AEC, DA-AEC and ARMED-AEC variants on the generated cell images.

Every model is trained and evaluated by the ``armed_microscopy_autoencoder`` bundle itself (``configs/train.json``,
only config overrides), for several seeds; each seed also draws its own data set (cells, batch signatures, splits).
Per model: reconstruction MSE and phenotype AUROC on seen batches (observed batch) and unseen batches (Z-predictor
membership for the random-effects models, fixed effects otherwise; fixed effects also reported), Davies-Bouldin and
Calinski-Harabasz of the z-scored fixed-effects latent against the batch (training set), and the one-way ANOVA F
across batches of the brightness, contrast, sharpness and SNR of the fixed-effects reconstructions (``anova_f``) and,
for random-effects models, of the mixed-effects ones (``anova_f_me``). Values are means over seeds; ``per_seed``
keeps each seed's. The wall time of each full bundle run (train + evaluate) is recorded.

    python benchmarks/microscopy_batches.py --json benchmarks/out/microscopy_batches.json --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from bundle_runner import (  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
    benchmark_parser,
    bundle_wall_seconds,
    parse_benchmark_args,
    run_benchmark,
    run_train_config,
)

from monai_armed.metrics import mean_ci95
from monai_armed.utils import nan_to_none

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundles" / "armed_microscopy_autoencoder" / "configs"
RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"
#: model name -> (trained model, evaluation mode on seen batches)
MODELS = {
    "conventional": ("conventional", "observed"),
    "domain_adversarial": ("domain_adversarial", "observed"),
    "armed": ("armed", "observed"),
    "armed_no_adversary": ("armed_no_adversary", "observed"),
    "armed_randomized_batch": ("armed", "randomized"),
    "armed_constant_adv_weight": ("armed_constant_adv_weight", "observed"),
}
#: trained model -> bundle overrides besides the benchmark's settings
TRAINED = {
    "conventional": {"variant": "conventional"},
    "domain_adversarial": {"variant": "domain_adversarial"},
    "armed": {"variant": "armed"},
    "armed_no_adversary": {"variant": "armed_no_adversary"},
    "armed_constant_adv_weight": {"variant": "armed", "adv_schedule": "constant"},
}
PAPER = {"conventional": {"auroc_seen": 0.817, "latent_db": 8.9, "latent_ch": 546}, "armed": {"auroc_seen": 0.869, "latent_db": 43.0, "latent_ch": 20.4}}  # fmt: skip  # noqa: E501
IMAGE_METRICS = ("brightness", "contrast", "sharpness", "snr")


def log(message: str) -> None:
    print(message, flush=True)


def model_scores(metrics: dict, seen_mode: str) -> dict:
    """The benchmark's figures of one bundle run's ``metrics.json``."""
    unseen_mode = "inferred" if "inferred" in metrics["unseen"] else "fixed"
    scores = {
        "seen": {k: metrics["seen"][seen_mode][k] for k in ("mse", "auroc", "balanced_accuracy")},
        "unseen": {k: metrics["unseen"][unseen_mode][k] for k in ("mse", "auroc", "balanced_accuracy")},
        "unseen_fixed": {k: metrics["unseen"]["fixed"][k] for k in ("mse", "auroc", "balanced_accuracy")},
        "latent_db": metrics["latent"]["fe"]["davies_bouldin"],
        "latent_ch": metrics["latent"]["fe"]["calinski_harabasz"],
        "anova_f": metrics["anova_f"]["fe"],
        "anova_f_original": metrics["anova_f"]["original"],
    }
    if "me" in metrics["anova_f"]:
        scores["anova_f_me"] = metrics["anova_f"]["me"]
    if "re" in metrics["latent"]:
        scores["latent_re_db"] = metrics["latent"]["re"]["davies_bouldin"]
        scores["latent_re_ch"] = metrics["latent"]["re"]["calinski_harabasz"]
    return scores


def _mean(values: list) -> object:
    """Mean over seeds of equally nested dicts of floats (None stays None)."""
    if isinstance(values[0], dict):
        return {k: _mean([v[k] for v in values]) for k in values[0]}
    finite = [v for v in values if v is not None]
    return float(np.mean(finite)) if finite else None


def run(args: argparse.Namespace) -> dict:
    overrides = {
        "epochs": args.epochs,
        "cells_per_batch": args.cells_per_batch,
        "gen_weight": args.gen_weight,
        "adv_schedule": args.adv_schedule,
    }
    per_seed: dict[str, list[dict]] = {name: [] for name in args.models}
    wall: dict[str, list[float]] = {}
    for seed in args.seeds:
        trained: dict[str, dict] = {}
        for name in args.models:
            model, seen_mode = MODELS[name]
            if model not in trained:
                log(f"seed {seed}: training {model}")
                root = args.work_dir / f"seed{seed}" / model
                trained[model] = run_train_config(
                    CONFIGS,
                    root,
                    ["$@vocabulary.save(@vocabulary_file)", "$@train#trainer.run()", "$@report.run()"],
                    dataset_dir=str(args.work_dir / f"data_seed{seed}"),
                    seed=seed,
                    data_seed=seed,
                    **{**overrides, **TRAINED[model]},
                )
                seconds = bundle_wall_seconds(root)
                if seconds is not None:
                    wall.setdefault(model, []).append(seconds)
            per_seed[name].append(model_scores(trained[model], seen_mode))
            s = per_seed[name][-1]
            log(
                f"  {name}: seen MSE {s['seen']['mse']:.4f} AUROC {s['seen']['auroc']:.3f}; unseen AUROC "
                f"{s['unseen']['auroc']:.3f}; latent DB {s['latent_db']:.2f} CH {s['latent_ch']:.1f}"
            )
    models = {name: {**_mean(runs), "per_seed": runs} for name, runs in per_seed.items()}
    return {
        "models": nan_to_none(models),
        "protocol": {
            "seeds": list(args.seeds),
            "settings": overrides,
            "seen_mode": {name: MODELS[name][1] for name in args.models},
            "model_overrides": {name: TRAINED[MODELS[name][0]] for name in args.models},
            "unseen_mode": "inferred (Z-predictor) for random-effects models, fixed otherwise; unseen_fixed: fixed",
            "latent": "fixed-effects latent of the training images (seen batches), each dimension z-scored",
            "anova_f": "fixed-effects reconstructions of the seen-batch test images; anova_f_me: mixed-effects ones",
            "wall_seconds_per_bundle_run": {k: float(np.mean(v)) for k, v in wall.items()},
        },
        "machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "reference_paper": PAPER,
    }


def _f(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


#: the classification scores reported with their 95% intervals: (column, score group)
_AUROCS = (("seen AUROC", "seen"), ("unseen AUROC", "unseen"), ("unseen AUROC (fixed)", "unseen_fixed"))


def _interval(values: Sequence[float | None]) -> str:
    """``mean [low, high]`` (95% t-interval over seeds) of the finite values, ``-`` without any."""
    finite = [v for v in values if v is not None and np.isfinite(v)]
    if not finite:
        return "-"
    mean, ci = mean_ci95(finite)
    return f"{mean:.3f}" if ci is None else f"{mean:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def interval_lines(results: dict, baseline: str = "conventional") -> list[str]:
    """The AUROCs of every model as mean [95% t-interval] over seeds and, paired by seed, each model minus
    ``baseline`` (every seed's data are shared by the models), with the per-seed differences."""
    models = results["models"]
    lines = [
        "AUROC, mean [95% t-interval] over seeds, and each model minus the conventional AEC paired by seed:",
        "",
        "| model | " + " | ".join(column for column, _ in _AUROCS) + " | unseen AUROC minus conventional (per seed) |",
        "|---|---|---|---|---|",
    ]
    base = [run["unseen"]["auroc"] for run in models[baseline]["per_seed"]] if baseline in models else None
    for name, entry in models.items():
        cells = [_interval([run[group]["auroc"] for run in entry["per_seed"]]) for _, group in _AUROCS]
        if base is None or name == baseline:
            cells.append("-")
        else:
            own = [run["unseen"]["auroc"] for run in entry["per_seed"]]
            diffs = [None if a is None or b is None else a - b for a, b in zip(own, base)]
            each = ", ".join("-" if d is None else f"{d:+.3f}" for d in diffs)
            cells.append(f"{_interval(diffs)} ({each})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def render_section(results: dict) -> str:
    proto = results["protocol"]
    lines = [
        "## Microscopy: phenotype across imaging batches (generated cells, `armed_microscopy_autoencoder` bundle)",
        "",
        f"`{proto['command']}` — {proto['date']}, {results['machine']['cpu_count']} CPUs, torch "
        f"{results['machine']['torch']}, {results['machine']['threads']} thread(s).",
        "",
        f"Seeds {proto['seeds']} (each its own data: 8 seen + 3 unseen batches, {proto['settings']['cells_per_batch']} "
        f"cells per batch, 4 frames each, 64x64), {proto['settings']['epochs']} epochs, gen weight "
        f"{proto['settings']['gen_weight']} ({proto['settings'].get('adv_schedule', 'constant')} schedule); means over "
        "seeds. Latent: z-scored fixed-effects latent of the training "
        "images against the batch (higher DB / lower CH = less batch clustering). ANOVA F across seen batches of the "
        "fixed-effects reconstructions (mixed-effects in brackets).",
        "",
        "| model | seen MSE | seen AUROC | unseen MSE | unseen AUROC | unseen AUROC (fixed) | latent DB | latent CH "
        "| F brightness | F contrast | F sharpness | F SNR |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in results["models"].items():
        cells = [_f(e["seen"]["mse"], 4), _f(e["seen"]["auroc"]), _f(e["unseen"]["mse"], 4), _f(e["unseen"]["auroc"])]
        cells += [_f(e["unseen_fixed"]["auroc"]), _f(e["latent_db"], 2), _f(e["latent_ch"], 1)]
        for metric in IMAGE_METRICS:
            me = f" ({_f(e['anova_f_me'][metric], 1)})" if "anova_f_me" in e else ""
            cells.append(_f(e["anova_f"][metric], 1) + me)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    walls = ", ".join(f"{k} {v:.0f} s" for k, v in proto["wall_seconds_per_bundle_run"].items())
    lines += ["", *interval_lines(results)]
    lines += [
        "",
        f"Wall time of one bundle run (train + evaluate): {walls}.",
        "",
        "`armed_constant_adv_weight`: ARMED with a constant adversarial weight instead of the default ramp "
        "(`adv_schedule constant`).",
        "",
        "Paper (melanoma PDX, Table V): conventional AEC seen AUROC 0.817, latent DB 8.9 / CH 546; ARMED-AEC 0.869, "
        "DB 43.0 / CH 20.4.",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = benchmark_parser(
        __doc__, list(MODELS), "0,1,2", ROOT / "benchmarks" / "out" / "microscopy_batches", "microscopy-batches"
    )
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--cells-per-batch", type=int, default=24)
    parser.add_argument("--gen-weight", type=float, default=0.03)
    parser.add_argument("--adv-schedule", default="dann", help="ramp of the adversarial weight (LossWeightSchedule)")
    return parse_benchmark_args(parser, argv, list(MODELS))


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_benchmark("benchmarks/microscopy_batches.py", argv, parse_args(argv), run, render_section, RESULTS_MD)


if __name__ == "__main__":
    main()
