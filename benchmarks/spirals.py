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
Spiral benchmark of the ARMED paper (Nguyen & Montillo, TPAMI 2023), as in the authors' spiral notebook.

Ten clusters of two-arm spirals, each cluster with its own random radius (``make_spiral_random_radius``, seed 48),
are split by a stratified 10-fold cross-validation on label x cluster. Every fold trains the paper's dense models
(conventional, cluster input, domain-adversarial, MLDG, ARMED, ARMED without adversary) for 10 epochs and reports the
test accuracy of the mixed-effects prediction with the true cluster, plus ARMED evaluated with randomized clusters
(an ablation, no extra training) and ARMED trained with the simultaneous (gradient-reversal) adversary update.
A leave-one-cluster-out run then measures ARMED on unseen clusters, with fixed effects only and with the random
effects weighted by a Z-predictor's inferred membership, against the conventional model.

Results go to a JSON file and to the spiral section of ``benchmarks/RESULTS.md``.

Usage::

    python benchmarks/spirals.py --json benchmarks/out/spirals.json
    python benchmarks/spirals.py --json /tmp/smoke.json --folds 2 --models conventional,armed --unseen-clusters 2
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from ignite.metrics import Accuracy
from monai.engines import SupervisedTrainer
from sklearn.model_selection import StratifiedKFold

from monai_armed.data import TensorBatchLoader, make_spiral_random_radius
from monai_armed.engines import MLDG_DEFAULTS, ARMEDEvaluator, ARMEDTrainer, PrepareBatchCluster, train_mldg
from monai_armed.metrics import mean_ci95, predicted_class
from monai_armed.networks import ClusterAdversary, MixedEffectsMLP, ZPredictor, variant_loss_weights
from monai_armed.utils import write_json
from cli import json_output, name_list, seed_list  # noqa: E402
from results_md import replace_section  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

DEVICE = torch.device("cpu")
N_CLUSTERS = 10
N_SPLITS = 10
DATA_SEED = 48
MODEL_SEED = 283
EPOCHS = 10
BATCH_SIZE = 32
EVAL_BATCH_SIZE = 1024
LR = 1e-3
GEN_WEIGHT = 0.5
#: the paper's weight of the summed KL; ``ARMEDTrainer`` divides the KL by the training rows (ELBO), so each fold
#: passes ``KL_WEIGHT * n_train`` to keep the paper's objective
KL_WEIGHT = 1e-5
ADVERSARY_HIDDEN = (4, 4)
#: ``--act`` choices: the paper's ReLU, and LeakyReLU(0.1), which keeps the 4-unit layers from dying.
ACTIVATIONS = {"relu": "relu", "leakyrelu": ("leakyrelu", {"negative_slope": 0.1})}
DATA_SETTINGS = {
    "clusters": N_CLUSTERS,
    "points_per_cluster": 1000,
    "mean_radius": 1,
    "inter_cluster_sd": 0.3,
    "degrees": 360,
    "noise": 0.1,
}
#: Random-effect settings of the notebook (``from_variant`` keeps each variant's own structure, so the baselines
#: stay without random effects and ignore these).
RE_SETTINGS = {
    "random_slopes": "hidden",
    "slope_prior_scale": 0.3,
    "slope_posterior_init_scale": 0.3,
    "intercept_prior_scale": 0.1,
    "intercept_posterior_init_scale": 0.1,
}

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"
REFERENCE = {
    "notebook": {"armed": 0.788, "conventional": 0.764},
    "tensorflow_rerun_here": {"armed": 0.763, "conventional": 0.714, "seconds_per_fold": 2.75},
}


@dataclass(frozen=True)
class ModelSpec:
    """How one benchmark entry is trained and evaluated.

    Attributes:
        variant: ``MLP_VARIANTS`` entry of the network.
        trainer: ``"armed"`` (``ARMEDTrainer``) or ``"mldg"`` (``train_mldg``).
        adversary_update: ``ARMEDTrainer``'s ``adversary_update``.
        eval_mode: ``ARMEDEvaluator``'s ``cluster_mode`` on the test fold.
        reuses: evaluate the network trained for this other entry instead of training one (its time is reported).
        kl_weight: ``ARMEDTrainer``'s multiplier of the ELBO's ``KL / n_train``; ``None``: the paper's objective
            (``KL_WEIGHT`` on the summed KL, i.e. ``KL_WEIGHT * n_train``).
        learn_prior: learn the random effects' prior scales (empirical Bayes) instead of fixing them.
    """

    variant: str
    trainer: str = "armed"
    adversary_update: str = "sequential"
    eval_mode: str = "observed"
    kl_weight: float | None = None
    learn_prior: bool = False
    reuses: str | None = None


MODELS: dict[str, ModelSpec] = {
    "conventional": ModelSpec("conventional"),
    "cluster_input": ModelSpec("cluster_input"),
    "domain_adversarial": ModelSpec("domain_adversarial"),
    "mldg": ModelSpec("conventional", trainer="mldg"),
    "armed": ModelSpec("armed"),
    "armed_no_adversary": ModelSpec("armed_no_adversary"),
    "armed_randomized_z": ModelSpec("armed", eval_mode="randomized", reuses="armed"),
    "armed_simultaneous": ModelSpec("armed", adversary_update="simultaneous"),
    "armed_elbo": ModelSpec("armed", kl_weight=1.0),
    "armed_elbo_eb": ModelSpec("armed", kl_weight=1.0, learn_prior=True),
    "armed_elbo_eb_no_adversary": ModelSpec("armed_no_adversary", kl_weight=1.0, learn_prior=True),
    "armed_elbo_eb_randomized_z": ModelSpec("armed", eval_mode="randomized", reuses="armed_elbo_eb"),
}

Data = dict[str, np.ndarray]


def log(message: str) -> None:
    print(message, flush=True)


def make_data() -> Data:
    """The notebook's data set: ``features`` (N, 2) float32, ``label`` and ``cluster`` (N,) int64."""
    np.random.seed(DATA_SEED)
    settings = {k: v for k, v in DATA_SETTINGS.items() if k != "clusters"}
    x, z, y, _ = make_spiral_random_radius(N_CLUSTERS, **settings)
    return {
        "features": x.astype(np.float32),
        "label": y[:, 1].astype(np.int64),
        "cluster": z.argmax(1).astype(np.int64),
    }


def subset(data: Data, index: np.ndarray) -> Data:
    return {key: value[index] for key, value in data.items()}


def fold_splits(data: Data) -> list[tuple[np.ndarray, np.ndarray]]:
    """Unshuffled stratified 10-fold split on the ``label_cluster`` strings, as in the notebook."""
    strata = np.array([f"{label}_{cluster}" for label, cluster in zip(data["label"], data["cluster"])])
    return list(StratifiedKFold(N_SPLITS).split(np.zeros(len(strata)), strata))


def adam(params) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=LR, fused=True)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def build_network(variant: str, n_clusters: int, act: str = "relu", learn_prior: bool = False) -> MixedEffectsMLP:
    return MixedEffectsMLP.from_variant(
        variant, in_features=2, out_channels=1, n_clusters=n_clusters, act=ACTIVATIONS[act], **RE_SETTINGS,
        re_kwargs={"learn_prior_scale": learn_prior},
    )


def build_model(
    spec: ModelSpec, n_clusters: int, seed: int, act: str = "relu"
) -> tuple[MixedEffectsMLP, nn.Module | None, dict]:
    """Network, adversary (``None`` without an adversarial term) and ``ARMEDTrainer`` loss weights, seeded like the
    notebook's ``tf.random.set_seed`` before building each model."""
    torch.manual_seed(seed)
    network = build_network(spec.variant, n_clusters, act, spec.learn_prior)
    weights = variant_loss_weights(spec.variant, gen_weight=GEN_WEIGHT)
    adversary = None
    if weights["adv_weight"] > 0:
        adversary = ClusterAdversary(
            network.feature_channels, n_clusters, hidden_channels=ADVERSARY_HIDDEN, act=ACTIVATIONS[act]
        )
    return network, adversary, weights


def train_one(
    spec: ModelSpec, train: Data, n_clusters: int, seed: int, loader_seed: int, act: str = "relu"
) -> tuple[nn.Module, float]:
    """Train one model; returns it and the wall time of the training run alone."""
    network, adversary, weights = build_model(spec, n_clusters, seed, act)
    if spec.trainer == "mldg":
        args = (train["features"], train["label"], train["cluster"])
        return network, timed(lambda: train_mldg(network, *args, **MLDG_DEFAULTS, seed=loader_seed, device=DEVICE))
    trainer = ARMEDTrainer(
        device=DEVICE,
        max_epochs=EPOCHS,
        train_data_loader=TensorBatchLoader(train, batch_size=BATCH_SIZE, shuffle=True, seed=loader_seed),
        network=network,
        optimizer=adam(network.parameters()),
        adversary=adversary,
        adv_optimizer=adam(adversary.parameters()) if adversary is not None else None,
        kl_weight=KL_WEIGHT * len(train["label"]) if spec.kl_weight is None else spec.kl_weight,
        adversary_update=spec.adversary_update,
        prepare_batch=PrepareBatchCluster("features", check_finite=True),
        decollate=False,
        **weights,
    )
    return network, timed(trainer.run)


def train_z_predictor(train: Data, n_clusters: int, seed: int, loader_seed: int) -> ZPredictor:
    """A ``ZPredictor`` fitted with a plain MONAI ``SupervisedTrainer`` (cluster index as the label)."""
    torch.manual_seed(seed)
    z_predictor = ZPredictor(in_features=2, n_clusters=n_clusters)
    loader = TensorBatchLoader(
        {"image": train["features"], "label": train["cluster"]}, batch_size=BATCH_SIZE, shuffle=True, seed=loader_seed
    )
    SupervisedTrainer(
        device=DEVICE,
        max_epochs=EPOCHS,
        train_data_loader=loader,
        network=z_predictor,
        optimizer=adam(z_predictor.parameters()),
        loss_function=nn.CrossEntropyLoss(),
        decollate=False,
    ).run()
    return z_predictor


def _thresholded(output: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return predicted_class(output["pred"]), output["label"].reshape(-1)


def evaluate(network: nn.Module, data: Data, mode: str, z_predictor: nn.Module | None = None, seed: int = 0) -> float:
    """Accuracy (logit > 0) of ``network`` on ``data`` in one ``ARMEDEvaluator`` cluster mode."""
    evaluator = ARMEDEvaluator(
        device=DEVICE,
        val_data_loader=TensorBatchLoader(data, batch_size=EVAL_BATCH_SIZE),
        network=network,
        cluster_mode=mode,
        z_predictor=z_predictor,
        seed=seed,
        prepare_batch=PrepareBatchCluster("features", require_cluster=False, check_finite=True),
        key_val_metric={"accuracy": Accuracy(output_transform=_thresholded)},
        decollate=False,
    )
    evaluator.run()
    return float(evaluator.state.metrics["accuracy"])


def summarize(accuracies: list[list[float]], seconds: list[list[float]]) -> dict:
    """JSON entry of one model from ``[fold][seed]`` accuracies and training times (per-fold means over seeds)."""
    test_acc = [float(np.mean(a)) for a in accuracies]
    train_seconds = [float(np.mean(s)) for s in seconds]
    mean, ci = mean_ci95(test_acc, method="normal")  # the notebook's 1.96 * sd / sqrt(n)
    return {
        "test_acc": test_acc,
        "test_acc_mean": mean,
        "test_acc_ci95": ci,
        "train_seconds_per_fold": train_seconds,
        "train_seconds_mean": float(np.mean(train_seconds)),
    }


def run_folds(data: Data, models: Sequence[str], n_folds: int, seeds: Sequence[int], act: str = "relu") -> dict:
    """Cross-validate ``models`` on the first ``n_folds`` of the 10 folds; entries that reuse another model's network
    train it once per fold and seed."""
    splits = fold_splits(data)[:n_folds]
    accuracies = {name: [[] for _ in splits] for name in models}
    seconds = {name: [[] for _ in splits] for name in models}
    for fold, (train_index, test_index) in enumerate(splits):
        train, test = subset(data, train_index), subset(data, test_index)
        for seed in seeds:
            trained: dict[str, tuple[nn.Module, float]] = {}
            for name in models:
                spec = MODELS[name]
                source = spec.reuses or name
                if source not in trained:
                    trained[source] = train_one(MODELS[source], train, N_CLUSTERS, seed, loader_seed=fold, act=act)
                network, train_seconds = trained[source]
                accuracy = evaluate(network, test, spec.eval_mode, seed=seed)
                accuracies[name][fold].append(accuracy)
                seconds[name][fold].append(train_seconds)
                log(
                    f"fold {fold + 1}/{len(splits)} seed {seed} {name:<20} "
                    f"acc {accuracy:.4f} train {train_seconds:6.2f} s"
                )
    return {name: summarize(accuracies[name], seconds[name]) for name in models}


def run_unseen(data: Data, n_held_out: int, seeds: Sequence[int], act: str = "relu") -> dict:
    """Leave-one-cluster-out: ARMED (fixed / inferred effects) and the conventional model on each held-out cluster."""
    clusters = list(range(min(n_held_out, N_CLUSTERS)))
    keys = ("armed_fixed", "armed_inferred", "conventional")
    per_cluster: dict[str, list[float]] = {key: [] for key in keys}
    n_seen = N_CLUSTERS - 1
    for held_out in clusters:
        is_held_out = data["cluster"] == held_out
        seen = np.setdiff1d(np.arange(N_CLUSTERS), [held_out])
        train = subset(data, ~is_held_out)
        train["cluster"] = np.searchsorted(seen, train["cluster"])  # contiguous 0..8
        test = subset(data, is_held_out)
        test["cluster"] = np.full_like(test["cluster"], -1)  # unseen
        scores: dict[str, list[float]] = {key: [] for key in keys}
        for seed in seeds:
            armed, _ = train_one(MODELS["armed"], train, n_seen, seed, loader_seed=held_out, act=act)
            conventional, _ = train_one(MODELS["conventional"], train, n_seen, seed, loader_seed=held_out, act=act)
            z_predictor = train_z_predictor(train, n_seen, seed, loader_seed=held_out)
            scores["armed_fixed"].append(evaluate(armed, test, "fixed"))
            scores["armed_inferred"].append(evaluate(armed, test, "inferred", z_predictor))
            scores["conventional"].append(evaluate(conventional, test, "fixed"))
        for key in keys:
            per_cluster[key].append(float(np.mean(scores[key])))
        log(f"unseen cluster {held_out}: " + " ".join(f"{key} {per_cluster[key][-1]:.4f}" for key in keys))
    result: dict = {
        "protocol": (
            "leave-one-cluster-out: train ARMED and the conventional model on the other 9 clusters (indices remapped "
            "to 0..8), a ZPredictor (8-8-4, Adam 1e-3, cross-entropy, 10 epochs, batch 32) on the same data; test on "
            "all 1000 points of the held-out cluster with fixed effects only ('fixed') and with the random effects "
            "weighted by the inferred membership ('inferred')"
        ),
        "clusters": clusters,
    }
    for key in keys:
        result[key] = per_cluster[key]
        result[f"{key}_mean"] = float(np.mean(per_cluster[key])) if clusters else None
    return result


def protocol(args: argparse.Namespace, command: str) -> dict:
    return {
        "data": {"generator": "make_spiral_random_radius", "seed": DATA_SEED, **DATA_SETTINGS},
        "folds": {"splitter": "StratifiedKFold(10), no shuffle, on f'{label}_{cluster}'", "run": args.folds},
        "seeds": list(args.seeds),
        "act": args.act,
        "section": section_name(args),
        "training": {
            "epochs": EPOCHS,
            "batch_size": BATCH_SIZE,
            "optimizer": f"Adam(lr={LR}, fused=True) for network and adversary",
            "loader": "TensorBatchLoader(shuffle=True, seed=fold)",
            "gen_weight": GEN_WEIGHT,
            "kl_weight": KL_WEIGHT,
            "adversary_hidden": list(ADVERSARY_HIDDEN),
            "random_effects": RE_SETTINGS,
            "mldg": {**MLDG_DEFAULTS, "seed": "fold"},
        },
        "test_accuracy": "mixed-effects logits with the observed cluster (ARMEDEvaluator 'observed'), logit > 0; "
        "armed_randomized_z: the armed network in mode 'randomized'",
        "timing": "time.perf_counter around trainer.run() (train_mldg for mldg); armed_randomized_z reuses armed's",
        "ci95": "mean +- 1.96 * sd(ddof=1) / sqrt(n) over the per-fold accuracies (each the mean over seeds)",
        "command": command,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def _ci_text(entry: dict) -> str:
    ci = entry["test_acc_ci95"]
    return f"{entry['test_acc_mean']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def render_section(results: dict) -> str:
    """Markdown of the spiral section (without the markers)."""
    proto, reference = results["protocol"], results["reference"]
    n_folds = len(next(iter(results["models"].values()))["test_acc"]) if results["models"] else 0
    lines = [
        f"## Spirals: random radius, 10 clusters ({proto['act']} networks, section `{proto['section']}`)",
        "",
        f"`{proto['command']}` — {proto['date']}, {results['machine']['cpu_count']} CPUs, torch "
        f"{results['machine']['torch']}, {results['machine']['threads']} thread.",
        "",
        f"{n_folds} of {N_SPLITS} stratified folds, seeds {proto['seeds']}, {EPOCHS} epochs, batch {BATCH_SIZE}, "
        f"Adam {LR}. Test accuracy of the mixed-effects prediction with the true cluster; training time is the wall "
        "time of the training run alone (`armed_randomized_z` evaluates the `armed` networks with random clusters).",
        "",
        "| model | test acc mean [95% CI] | train s/fold |",
        "|---|---|---|",
    ]
    for name, entry in results["models"].items():
        lines.append(f"| {name} | {_ci_text(entry)} | {entry['train_seconds_mean']:.2f} |")
    unseen = results["unseen"]
    if unseen["clusters"]:
        lines += ["", f"Unseen clusters ({unseen['protocol']}):", ""]
        lines += ["| held-out cluster | ARMED fixed | ARMED inferred Z | conventional |", "|---|---|---|---|"]
        rows = zip(unseen["clusters"], unseen["armed_fixed"], unseen["armed_inferred"], unseen["conventional"])
        lines += [f"| {c} | {a:.3f} | {b:.3f} | {d:.3f} |" for c, a, b, d in rows]
        means = (unseen["armed_fixed_mean"], unseen["armed_inferred_mean"], unseen["conventional_mean"])
        lines.append("| **mean** | " + " | ".join(f"**{m:.3f}**" for m in means) + " |")
    notebook, rerun = reference["notebook"], reference["tensorflow_rerun_here"]
    lines += [
        "",
        f"Reference: authors' notebook ARMED {notebook['armed']:.3f}, conventional {notebook['conventional']:.3f}; "
        f"their TensorFlow code rerun on this machine ARMED {rerun['armed']:.3f}, conventional "
        f"{rerun['conventional']:.3f}, {rerun['seconds_per_fold']:.2f} s/fold.",
    ]
    return "\n".join(lines)


def section_name(args: argparse.Namespace) -> str:
    """RESULTS.md section of a run: ``--section``, else ``spirals`` (paper's ReLU) or ``spirals-<act>``."""
    return args.section or ("spirals" if args.act == "relu" else f"spirals-{args.act}")


def write_results_md(path: Path, results: dict) -> None:
    """Replace this run's spiral section of ``path``, keeping the other sections."""
    replace_section(path, results["protocol"]["section"], render_section(results))


def print_table(results: dict) -> None:
    log(f"\n{'model':<20} {'test acc [95% CI]':<26} {'train s/fold':>12}")
    for name, entry in results["models"].items():
        log(f"{name:<20} {_ci_text(entry):<26} {entry['train_seconds_mean']:>12.2f}")
    unseen = results["unseen"]
    if unseen["clusters"]:
        log(f"\nunseen clusters {unseen['clusters']}:")
        for key in ("armed_fixed", "armed_inferred", "conventional"):
            log(f"{key:<20} {unseen[f'{key}_mean']:.3f}")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--json", required=True, type=json_output, help="output JSON file")
    parser.add_argument("--folds", type=int, default=N_SPLITS, help="run the first N of the 10 folds (default 10)")
    parser.add_argument("--models", default=",".join(MODELS), type=name_list, help=f"comma-separated subset of {', '.join(MODELS)}")
    parser.add_argument("--seeds", default=str(MODEL_SEED), type=seed_list, help="comma-separated model seeds (default 283)")
    parser.add_argument(
        "--unseen-clusters", type=int, default=N_CLUSTERS, help="leave out each of the first N clusters (default 10)"
    )
    parser.add_argument(
        "--act", choices=sorted(ACTIVATIONS), default="relu", help="hidden activation (relu: the paper's networks)"
    )
    parser.add_argument("--section", default=None, help=f"name of the {RESULTS_MD.name} section to rewrite")
    parser.add_argument("--no-results-md", action="store_true", help=f"do not rewrite {RESULTS_MD.name}")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}.")
    if not 1 <= args.folds <= N_SPLITS:
        parser.error(f"--folds must be in 1..{N_SPLITS}.")
    if not 0 <= args.unseen_clusters <= N_CLUSTERS:
        parser.error(f"--unseen-clusters must be in 0..{N_CLUSTERS}.")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    # Batches of 32 x 2 features: intra-op threading only adds synchronisation overhead.
    torch.set_num_threads(1)
    start = time.perf_counter()
    data = make_data()
    results = {
        "models": run_folds(data, args.models, args.folds, args.seeds, args.act),
        "unseen": run_unseen(data, args.unseen_clusters, args.seeds, args.act),
        "protocol": protocol(args, shlex.join(["python", "benchmarks/spirals.py", *argv])),
        "machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "reference": REFERENCE,
    }
    results["protocol"]["total_wall_seconds"] = time.perf_counter() - start
    write_json(results, args.json)
    if not args.no_results_md:
        write_results_md(RESULTS_MD, results)
    print_table(results)
    log(f"\ntotal {results['protocol']['total_wall_seconds']:.1f} s; results in {args.json}")
    return results


if __name__ == "__main__":
    main()
