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
"""How much can knowing the site add on seen sites? A diagnostic for the MRI benchmark's seen-site target.

Random intercepts can raise the pooled seen-site AUROC above what the images give only where the network's logits do
not already carry the site's patient fraction. For each seed this trains the conventional CNN and ARMED with the
``armed_mri_classification`` bundle (same settings as ``mri_sites.py``) and reports on the seen-site test set: the
pooled AUROC, the mean within-site AUROC, and an oracle that adds the site's training log-odds of AD to the logit
with the weight that is best *on the test set itself* (an upper bound on what a per-site intercept of that form
could add).

    python benchmarks/mri_site_headroom.py --json benchmarks/out/mri_site_headroom.json --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.bundle import ConfigWorkflow
from mri_sites import CONFIGS, RESULTS_MD, ROOT, log  # noqa: E402  (benchmarks/ is on sys.path as a script)
from cli import json_output, seed_list  # noqa: E402
from results_md import replace_section  # noqa: E402
from sklearn.metrics import roc_auc_score

from monai_armed.metrics import mean_ci95
from monai_armed.utils import write_json

SETTINGS = {"subjects_per_site": 48, "epochs": 40, "image_size": 96, "gen_weight": 0.1, "kl_weight": 0.23}
WEIGHTS = np.linspace(0.0, 3.0, 31)


def _predictions(network: torch.nn.Module, dataset: Sequence[dict]) -> dict[str, np.ndarray]:
    label, cluster, fe, observed = [], [], [], []
    with torch.no_grad():
        for start in range(0, len(dataset), 64):
            items = [dataset[i] for i in range(start, min(len(dataset), start + 64))]
            x = torch.stack([torch.as_tensor(item["image"]) for item in items]).float()
            c = torch.tensor([int(item["cluster"]) for item in items])
            label += [int(item["label"]) for item in items]
            cluster += c.tolist()
            fe.append(network(x).reshape(-1))
            observed.append(network(x, c).reshape(-1))
    return {"label": np.array(label), "cluster": np.array(cluster), "fe": torch.cat(fe).numpy(),
            "observed": torch.cat(observed).numpy()}  # fmt: skip


def headroom(train: dict[str, np.ndarray], test: dict[str, np.ndarray]) -> dict[str, float]:
    """Pooled, within-site and site-prior-oracle AUROCs of one model's seen-site test predictions."""
    sites = np.unique(train["cluster"])
    fraction = {c: train["label"][train["cluster"] == c].mean() for c in sites}
    log_odds = np.array([np.log(fraction[c] / (1 - fraction[c])) for c in test["cluster"]])
    within = [
        roc_auc_score(test["label"][test["cluster"] == c], test["fe"][test["cluster"] == c])
        for c in sites
        if len(set(test["label"][test["cluster"] == c])) == 2
    ]
    oracle = [roc_auc_score(test["label"], test["fe"] / test["fe"].std() + w * log_odds) for w in WEIGHTS]
    return {
        "pooled_fe": roc_auc_score(test["label"], test["fe"]),
        "pooled_observed": roc_auc_score(test["label"], test["observed"]),
        "within_site_fe": float(np.mean(within)),
        "site_prior_oracle": float(max(oracle)),
        "site_prior_oracle_weight": float(WEIGHTS[int(np.argmax(oracle))]),
    }


def train_and_measure(variant: str, seed: int, work_dir: Path) -> dict[str, float]:
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "train.json"),
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        workflow_type="train",
        bundle_root=str(work_dir / f"seed{seed}" / variant),
        dataset_dir=str(work_dir / f"data_seed{seed}"),
        variant=variant,
        seed=seed,
        data_seed=seed,
        val_interval=SETTINGS["epochs"],
        run=["$@vocabulary.save(@vocabulary_file)", "$@train#trainer.run()"],
        **SETTINGS,
    )
    workflow.initialize()
    workflow.run()
    network = workflow.parser.get_parsed_content("network").eval()
    train = _predictions(network, workflow.parser.get_parsed_content("train#cache"))
    test = _predictions(network, workflow.parser.get_parsed_content("evaluation#test_dataset"))
    workflow.finalize()
    return headroom(train, test)


def render_section(results: dict) -> str:
    lines = [
        "## MRI: what knowing the site can add on seen sites (section `mri-site-headroom`)",
        "",
        f"`{results['command']}` — {results['date']}. Seen-site test AUROC, mean [95% t-interval] over seeds "
        f"{results['seeds']}; settings of `mri-sites`. Oracle: fixed-effects logit (standardised) plus w x the "
        "site's training log-odds of AD, w chosen on the test set (an upper bound for a prevalence intercept).",
        "",
        "| model | pooled (fixed effects) | pooled (observed site) | mean within-site | site-prior oracle |",
        "|---|---|---|---|---|",
    ]
    for name, entry in results["models"].items():
        cells = []
        for key in ("pooled_fe", "pooled_observed", "within_site_fe", "site_prior_oracle"):
            mean, ci = entry[key]["mean"], entry[key]["ci95"]
            cells.append(f"{mean:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=json_output, required=True)
    parser.add_argument("--seeds", default="0,1,2", type=seed_list)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "benchmarks" / "out" / "mri_site_headroom")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-results-md", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    per_seed: dict[str, list[dict]] = {"conventional": [], "armed": []}
    for seed in args.seeds:
        for variant in per_seed:
            log(f"seed {seed}: {variant}")
            per_seed[variant].append(train_and_measure(variant, seed, args.work_dir))
            log(f"  {per_seed[variant][-1]}")
    models = {}
    for name, runs in per_seed.items():
        models[name] = {}
        for key in runs[0]:
            values = [r[key] for r in runs]
            mean, ci = mean_ci95(values) if len(values) > 1 else (values[0], None)
            models[name][key] = {"mean": mean, "ci95": ci, "values": values}
    results = {
        "models": models,
        "seeds": args.seeds,
        "settings": SETTINGS,
        "command": shlex.join(["python", "benchmarks/mri_site_headroom.py", *argv]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    write_json(results, args.json)
    if not args.no_results_md:
        replace_section(RESULTS_MD, "mri-site-headroom", render_section(results))
    log(render_section(results))
    return results


if __name__ == "__main__":
    main()
