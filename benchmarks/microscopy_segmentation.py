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
"""Multi-batch nucleus segmentation benchmark: conventional, domain-adversarial and ARMED UNets on generated fields.

Every model is trained and evaluated by the ``armed_microscopy_segmentation`` bundle itself (``configs/train.json``,
only config overrides), for several seeds; each seed draws its own data set (nuclei, batch signatures, splits), shared
by every model. The unseen batches' odd-numbered fields are the unseen test set of every model; ``oracle`` is the
conventional UNet trained also on their even-numbered fields (so it has seen those batches): the headroom of any method
on unseen batches. Per model: the mean per-image Dice on the seen batches' test fields (observed batch) and on the
unseen test fields (fixed effects; ARMED's Z-predictor membership also reported), with 95% t-intervals over seeds and
ARMED's paired gain over the conventional UNet. The step time of ARMED against the conventional UNet is measured in
one process, interleaved (A, B, A, B ...) on the same batch: medians and their ratio.

    python benchmarks/microscopy_segmentation.py --json benchmarks/out/microscopy_segmentation.json --seeds 0,1,2,3,4
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from bundle_runner import (  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
    benchmark_parser,
    bundle_wall_seconds,
    interleaved_step_seconds,
    parse_benchmark_args,
    run_benchmark,
    run_train_config,
)
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from results_md import replace_section  # noqa: E402

from monai_armed.data import TensorBatchLoader, ensure_nucleus_dataset
from monai_armed.engines import ARMEDTrainer
from monai_armed.metrics import mean_ci95
from monai_armed.networks import ARMED, ClusterAdversary, variant_loss_weights
from monai_armed.utils import write_json

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundles" / "armed_microscopy_segmentation" / "configs"
RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"
#: model name -> (bundle overrides, datalist: "eval" or "oracle")
MODELS = {
    "conventional": ({"variant": "conventional"}, "eval"),
    "domain_adversarial": ({"variant": "domain_adversarial"}, "eval"),
    "armed": ({"variant": "armed"}, "eval"),
    "oracle": ({"variant": "conventional"}, "oracle"),
}
RUN = [
    "$@vocabulary.save(@vocabulary_file)",
    "$@train#trainer.run()",
    "$@zpredictor_train#trainer.run() if @has_random_effects else None",
    "$@report.run()",
]


def log(message: str) -> None:
    print(message, flush=True)


def _summary(values: list[float]) -> dict:
    mean, ci = mean_ci95(values)
    return {"mean": mean, "ci95": ci, "per_seed": values}


def _scores(metrics: dict) -> dict[str, float]:
    unseen = metrics["unseen"]
    return {
        "seen": metrics["seen"]["observed"]["dice"],
        "unseen": unseen["fixed"]["dice"],
        "unseen_inferred": unseen["inferred"]["dice"] if "inferred" in unseen else unseen["fixed"]["dice"],
    }


def _field_number(item: dict) -> int:
    return int(item["field"].rsplit("_v", 1)[1])


def datalists(work_dir: Path, seed: int) -> dict[str, Path]:
    """The seed's generated data (the bundle's defaults) as two datalists with absolute paths, in folders the bundle
    reads as ``dataset_dir``: ``eval`` (unseen: the odd-numbered fields of each unseen batch) and ``oracle`` (the same,
    with the even-numbered unseen fields added to training)."""
    source = ensure_nucleus_dataset(work_dir / f"data_seed{seed}", seed=seed)
    sections = {
        name: [dict(i, image=str(source.parent / i["image"]), label=str(source.parent / i["label"])) for i in items]
        for name, items in json.loads(source.read_text()).items()
    }
    held = [i for i in sections["unseen"] if _field_number(i) % 2 == 1]
    shown = [i for i in sections["unseen"] if _field_number(i) % 2 == 0]
    lists = {
        "eval": {**sections, "unseen": held},
        "oracle": {**sections, "training": sections["training"] + shown, "unseen": held},
    }
    folders = {}
    for name, content in lists.items():
        folders[name] = work_dir / f"seed{seed}" / f"{name}_data"
        folders[name].mkdir(parents=True, exist_ok=True)
        (folders[name] / "datalist.json").write_text(json.dumps(content))
    return folders


#: the step-time candidates: name -> (variant, ARMED keyword arguments, with the adversary); the last two take one
#: part away from ARMED to show what it costs
TIMED = {
    "conventional": ("conventional", {}, False),
    "armed": ("armed", {}, True),
    "armed_without_random_scale": ("armed", {"random_slope": False}, True),
    "armed_without_adversary": ("armed", {}, False),
    "conventional_wide": ("conventional", {}, False),
    "armed_wide": ("armed", {}, True),
}
#: the bundle's UNet, and a twice as wide one (``*_wide``): ARMED's overhead per step is nearly fixed, so its ratio
#: depends on the backbone's size
CHANNELS = {"": (16, 32, 64, 128), "_wide": (32, 64, 128, 256)}


def _trainer(name: str, n_clusters: int, batch: dict, gen_weight: float) -> ARMEDTrainer:
    """The bundle's network and trainer for a ``TIMED`` candidate on one fixed batch (what a training step costs)."""
    variant, kwargs, with_adversary = TIMED[name]
    torch.manual_seed(0)
    channels = CHANNELS["_wide" if name.endswith("_wide") else ""]
    backbone = UNet(2, 1, 2, channels=channels, strides=(2, 2, 2), num_res_units=0, norm="instance")
    network = ARMED.from_variant(
        variant, backbone, n_clusters, in_shape=(1, 96, 96), re_kwargs={"learn_prior_scale": True}, **kwargs
    )
    weights = variant_loss_weights(variant, gen_weight=gen_weight)
    adversary = ClusterAdversary(network.feature_channels, n_clusters, (32, 16), input_norm=True)
    adv_weight = weights["adv_weight"] if with_adversary else 0.0
    return ARMEDTrainer(
        device="cpu", max_epochs=1, train_data_loader=TensorBatchLoader(batch, batch_size=8), network=network,
        optimizer=torch.optim.Adam(network.parameters(), 2e-3), loss_function=DiceCELoss(to_onehot_y=True, softmax=True),
        adversary=adversary if adv_weight else None, me_weight=weights["me_weight"], fe_weight=weights["fe_weight"],
        adv_weight=adv_weight, kl_weight=1.0 / 96**2, decollate=False, epoch_metrics=False,
    )  # fmt: skip


def step_time_ratio(repeats: int, iterations: int, gen_weight: float) -> dict:
    """Median seconds per training step of every ``TIMED`` candidate, interleaved, and ARMED's ratio to the
    conventional UNet."""
    g = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.rand(8 * iterations, 1, 96, 96, generator=g),
        "label": (torch.rand(8 * iterations, 1, 96, 96, generator=g) > 0.8).long(),
        "cluster": torch.arange(8 * iterations) % 6,
    }
    trainers = {name: _trainer(name, 6, batch, gen_weight) for name in TIMED}
    seconds = interleaved_step_seconds(trainers, repeats, iterations)
    medians = {name: float(np.median(v)) for name, v in seconds.items()}
    ratios = {name: medians[name] / medians["conventional_wide" if name.endswith("_wide") else "conventional"] for name in medians}
    return {"median_seconds": medians, "ratio": ratios["armed"], "ratios": ratios, "per_repeat": seconds}


def run(args: argparse.Namespace) -> dict:
    per_seed: dict[str, list[dict]] = {name: [] for name in args.models}
    wall: dict[str, list[float]] = {}
    for seed in args.seeds:
        folders = datalists(args.work_dir, seed)
        for name in args.models:
            log(f"seed {seed}: {name}")
            overrides, data = MODELS[name]
            root = args.work_dir / f"seed{seed}" / name
            metrics = run_train_config(
                CONFIGS, root, RUN, dataset_dir=str(folders[data]), generate_default_data=False, seed=seed,
                epochs=args.epochs, **overrides,
            )  # fmt: skip
            seconds = bundle_wall_seconds(root)
            if seconds is not None:
                wall.setdefault(name, []).append(seconds)
            per_seed[name].append(_scores(metrics))
            s = per_seed[name][-1]
            log(f"  {name}: seen Dice {s['seen']:.4f}, unseen {s['unseen']:.4f} (inferred {s['unseen_inferred']:.4f})")
    models = {
        name: {part: {"dice": _summary([s[part] for s in runs])} for part in ("seen", "unseen", "unseen_inferred")}
        for name, runs in per_seed.items()
    }
    if "armed" in per_seed and "conventional" in per_seed:
        for part in ("seen", "unseen"):
            gains = [a[part] - c[part] for a, c in zip(per_seed["armed"], per_seed["conventional"])]
            models["armed"][part]["dice_gain_over_conventional"] = _summary(gains)
    timing = step_time_ratio(args.timing_repeats, args.timing_iterations, args.gen_weight)
    return {
        "seeds": list(args.seeds),
        "models": models,
        "step_time_ratio": timing["ratio"],
        "step_time": timing,
        "protocol": {
            "epochs": args.epochs,
            "seen": "mean per-image Dice (nucleus class) of the seen batches' test fields, observed batch",
            "unseen": "odd-numbered fields of the unseen batches, fixed effects; unseen_inferred: Z-predictor membership",
            "oracle": "conventional UNet trained also on the even-numbered fields of the unseen batches",
            "model_overrides": {name: MODELS[name][0] for name in args.models},
            "wall_seconds_per_bundle_run": {k: float(np.mean(v)) for k, v in wall.items()},
            "timing": timing_protocol(args),
        },
        "machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()},
    }


def _cell(summary: dict) -> str:
    ci = summary["ci95"]
    return f"{summary['mean']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def render_section(results: dict) -> str:
    p = results["protocol"]
    lines = [
        "## Nucleus segmentation across imaging batches (generated fields, `armed_microscopy_segmentation` bundle)",
        "",
        f"`{p['command']}` — {p['date']}, {results['machine']['cpu_count']} CPUs, torch {results['machine']['torch']}, "
        f"{results['machine']['threads']} thread(s).",
        "",
        f"Seeds {results['seeds']} (each its own data, shared by the models), {p['epochs']} epochs. Mean per-image Dice "
        "with 95% t-intervals over seeds; unseen: " + p["unseen"] + "; oracle: " + p["oracle"] + ".",
        "",
        "| model | seen Dice | unseen Dice (fixed effects) | unseen Dice (Z-predictor) |",
        "|---|---|---|---|",
    ]
    for name, m in results["models"].items():
        cells = [_cell(m[part]["dice"]) for part in ("seen", "unseen", "unseen_inferred")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    armed = results["models"].get("armed", {})
    if "dice_gain_over_conventional" in armed.get("seen", {}):
        lines += ["", "ARMED - conventional, paired by seed: seen "
                  + _cell(armed["seen"]["dice_gain_over_conventional"]) + ", unseen "
                  + _cell(armed["unseen"]["dice_gain_over_conventional"]) + "."]  # fmt: skip
        for part in ("seen", "unseen"):
            values = ", ".join(f"{v:+.3f}" for v in armed[part]["dice_gain_over_conventional"]["per_seed"])
            lines.append(f"Per seed ({part}): {values}.")
    t = results["step_time"]
    parts = ", ".join(f"{name} {t['ratios'][name]:.2f}x" for name in ("armed_without_random_scale", "armed_without_adversary"))
    wide = (
        f"; the same with a UNet twice as wide (32-256 channels): ARMED {1000 * t['median_seconds']['armed_wide']:.0f} ms, "
        f"conventional {1000 * t['median_seconds']['conventional_wide']:.0f} ms, ratio {t['ratios']['armed_wide']:.2f}"
    )
    lines += [
        "",
        f"Training step ({p['timing']}"
        + (
            f"; measured again on {p['timing_date']} with {p['timing_machine']['threads']} thread(s) by "
            f"`{p['timing_command']}`"
            if "timing_command" in p
            else ""
        )
        + f"): ARMED {1000 * t['median_seconds']['armed']:.0f} ms, "
        f"conventional {1000 * t['median_seconds']['conventional']:.0f} ms, ratio {results['step_time_ratio']:.2f} "
        f"({parts}){wide}.",
        "Wall time of one bundle run (train + report): "
        + ", ".join(f"{k} {v:.0f} s" for k, v in p["wall_seconds_per_bundle_run"].items()) + ".",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = benchmark_parser(
        __doc__, list(MODELS), "0,1,2,3,4", ROOT / "benchmarks" / "out" / "microscopy_segmentation", "microscopy-segmentation"
    )
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--gen-weight", type=float, default=0.05, help="the bundle's gen_weight (timing networks)")
    parser.add_argument("--timing-repeats", type=int, default=7)
    parser.add_argument("--timing-iterations", type=int, default=5)
    parser.add_argument(
        "--timing-only", action="store_true",
        help="re-time the training step only and keep the Dice results already in --json (after a change of speed); "
        "--seeds, --models and --epochs are not used",
    )  # fmt: skip
    return parse_benchmark_args(parser, argv, list(MODELS))


def timing_protocol(args: argparse.Namespace) -> str:
    return (
        f"{args.timing_repeats} interleaved repeats of {args.timing_iterations} steps, batch 8 x 96 x 96, "
        "instance-norm UNet (16-128 channels)"
    )


def retime(args: argparse.Namespace, command: str) -> dict:
    """The results already in ``args.json`` with the step timing measured again (and the command that did it)."""
    if not args.json.exists():
        raise SystemExit(f"--timing-only updates an earlier run's results, but {args.json} does not exist.")
    results = json.loads(args.json.read_text())
    timing = step_time_ratio(args.timing_repeats, args.timing_iterations, args.gen_weight)
    results["step_time_ratio"], results["step_time"] = timing["ratio"], timing
    results["protocol"]["timing_command"], results["protocol"]["timing"] = command, timing_protocol(args)
    results["protocol"]["timing_date"] = datetime.datetime.now().isoformat(timespec="seconds")
    results["protocol"]["timing_machine"] = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    return results


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if not args.timing_only:
        return run_benchmark("benchmarks/microscopy_segmentation.py", argv, args, run, render_section, RESULTS_MD)
    torch.set_num_threads(args.threads)
    results = retime(args, shlex.join(["python", "benchmarks/microscopy_segmentation.py", *argv]))
    write_json(results, args.json)
    if not args.no_results_md:
        replace_section(RESULTS_MD, args.section, render_section(results))
    print(render_section(results), flush=True)
    return results


if __name__ == "__main__":
    main()
