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
Step time and peak memory of a full ARMED training step as the number of levels of a grouping factor grows.

    python benchmarks/cluster_scale.py --json benchmarks/out/cluster_scale.json --dense-baseline
    python benchmarks/cluster_scale.py --json /tmp/scale_smoke.json --levels 10,1000 --repeats 1 --steps 3 \\
        --no-results-md

The model is a :class:`~monai_armed.networks.nets.MixedModelNet` with an MLP fixed part (hidden 32-16) on an intercept
and 10 inputs, a ``subject`` factor with a random intercept and random slopes on the 10 inputs (11 correlated effects
per level, full-covariance posterior and prior) at ``L`` levels, and a ``site`` factor with a random intercept at 10
levels, which a :class:`~monai_armed.networks.ClusterAdversary` reads from the hidden activations. One step is one
iteration of :class:`~monai_armed.engines.ARMEDTrainer` (Gaussian likelihood, sequential adversary step, then the main
step on the per-sample ELBO) on a batch of 256 rows, timed from ignite's ``ITERATION_STARTED`` to
``ITERATION_COMPLETED`` (the batch is already fetched).

Sparse configuration (the one the targets are about): ``sparse=True`` look-ups, level counts given so the KL is the
batch estimate, :class:`~monai_armed.optimizers.LazyAdam`; a step touches only the batch's levels. Dense configuration
(``--dense-baseline``, at 10 and 10^5 levels): dense look-ups, ``torch.optim.Adam`` and the exact KL over every level
at every step.

Step times: every configuration lives in one process and the configurations take turns (10, 10^4, 10^5, 10^6, 10,
...) for ``--repeats`` rounds; each round runs ``--warmup`` untimed then ``--steps`` timed steps on fresh random rows
(the subject of each row uniform over the ``L`` levels), and the reported ``step_ms`` is the median over rounds of each
round's median. Peak memory: a fresh child process per configuration builds the model and takes the same warm-up and
timed steps once; its ``ru_maxrss`` is the peak resident set (memory only grows within a process).

The loader holds only the rows the steps read; ``level_counts`` and ``n_train`` describe a notional training set of
``max(L, 256 * (warmup + steps))`` rows spread evenly over the levels (the count only scales the KL estimate).

Targets: the sparse step at 10^6 levels at most 1.5x the step at 10 levels; peak memory at 10^6 levels under 1.5 GB.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from ignite.engine import Events
from cli import json_output, positive_int  # noqa: E402
from results_md import replace_section  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from monai_armed.data import TensorBatchLoader
from monai_armed.engines import ARMEDTrainer, PrepareBatchCluster
from monai_armed.losses import GaussianLikelihood
from monai_armed.networks import ClusterAdversary
from monai_armed.networks.nets.mixed_model import FactorSpec, MixedModelNet
from monai_armed.optimizers import LazyAdam
from monai_armed.utils import write_json

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "cluster-scale"
N_INPUTS = 10
N_SITES = 10
HIDDEN = (32, 16)
DENSE_LEVELS = (10, 100_000)
TERMS = ["(Intercept)"] + [f"x{k}" for k in range(1, N_INPUTS + 1)]
STEP_RATIO_TARGET = 1.5
PEAK_MB_TARGET = 1500.0


def log(message: str) -> None:
    print(message, flush=True)


def notional_rows(levels: int, batch_size: int, steps: int) -> tuple[int, int]:
    """``(rows per level, n_train)`` of the notional training set the level counts describe."""
    per_level = -(-max(levels, batch_size * steps) // levels)
    return per_level, per_level * levels


def make_batches(levels: int, n_rows: int, seed: int) -> dict[str, torch.Tensor]:
    """``n_rows`` synthetic rows: the design ``[1, x | 1, x | 1]`` (fixed, subject, site), a response, the levels."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n_rows, N_INPUTS, generator=generator)
    ones = torch.ones(n_rows, 1)
    subject = torch.randint(0, levels, (n_rows,), generator=generator)
    site = torch.randint(0, N_SITES, (n_rows,), generator=generator)
    y = x[:, :3].sum(1, keepdim=True) + 0.5 * torch.randn(n_rows, 1, generator=generator)
    features = torch.cat([ones, x, ones, x, ones], dim=1)
    return {"features": features, "label": y, "subject": subject, "site": site}


class PrepareFactors:
    """``(x, y, (), {"cluster": {"subject": ..., "site": ...}})`` from a dictionary batch (several grouping factors).

    Used when the library's :class:`PrepareBatchCluster` takes a single cluster key only.
    """

    def __init__(self, image_key: str, factors: Sequence[str]) -> None:
        self.image_key, self.factors = image_key, list(factors)

    def __call__(
        self, batchdata: Mapping[str, torch.Tensor], device: str | torch.device | None = None,
        non_blocking: bool = False, **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        x = batchdata[self.image_key].to(device=device, non_blocking=non_blocking)
        y = batchdata["label"].to(device=device, non_blocking=non_blocking)
        cluster = {f: batchdata[f].to(device=device, non_blocking=non_blocking) for f in self.factors}
        return x, y, (), {"cluster": cluster}


def prepare_batch() -> tuple[object, str]:
    """The library's multi-key ``PrepareBatchCluster`` when it has one, else :class:`PrepareFactors`."""
    factors = ["subject", "site"]
    probe = make_batches(10, 4, 0)
    try:
        prepare = PrepareBatchCluster(image_key="features", cluster_key=factors)
        _, _, _, kwargs = prepare(probe, torch.device("cpu"))
        if isinstance(kwargs.get("cluster"), Mapping) and set(kwargs["cluster"]) == set(factors):
            return prepare, "PrepareBatchCluster(cluster_key=['subject', 'site'])"
    except (TypeError, KeyError, ValueError):
        pass
    return PrepareFactors("features", factors), "local PrepareFactors (PrepareBatchCluster takes one cluster key)"


class StepTimer:
    """Wall time of each trainer iteration (``ITERATION_STARTED`` to ``ITERATION_COMPLETED``), in milliseconds."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def attach(self, trainer: ARMEDTrainer) -> None:
        trainer.add_event_handler(Events.ITERATION_STARTED, self._started)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._completed)

    def _started(self, _engine) -> None:
        self._start = time.perf_counter()

    def _completed(self, _engine) -> None:
        self.times.append((time.perf_counter() - self._start) * 1000.0)


class Config:
    """One configuration (levels, sparse or dense): its network, adversary, optimizers and trainer, built once."""

    def __init__(self, levels: int, dense: bool, args: argparse.Namespace, seed: int) -> None:
        self.levels, self.dense, self.args = levels, dense, args
        self.name = f"{'dense' if dense else 'sparse'}-{levels}"
        torch.manual_seed(seed)
        per_level, self.n_train = notional_rows(levels, args.batch_size, args.warmup + args.steps)
        subject_counts = None if dense else torch.full((levels,), float(per_level))
        site_counts = None if dense else torch.full((N_SITES,), float(self.n_train / N_SITES))
        factors = {
            "subject": FactorSpec(levels, TERMS, counts=subject_counts),
            "site": FactorSpec(N_SITES, ["(Intercept)"], counts=site_counts),
        }
        self.network = MixedModelNet(1 + N_INPUTS, factors, hidden_channels=HIDDEN, sparse=not dense)
        self.adversary = ClusterAdversary(self.network.feature_channels, n_clusters=N_SITES)
        params = self.network.parameters()
        optimizer = torch.optim.Adam(params, lr=args.lr) if dense else LazyAdam(params, lr=args.lr, rowwise=True)
        self.prepare, self.prepare_name = prepare_batch()
        self.trainer = ARMEDTrainer(
            device="cpu",
            max_epochs=1,
            train_data_loader=self._loader(seed),
            network=self.network,
            optimizer=optimizer,
            loss_function=GaussianLikelihood(),
            adversary=self.adversary,
            adversary_factor="site",
            prepare_batch=self.prepare,
            n_train=self.n_train,
            optim_set_to_none=True,
        )
        self.timer = StepTimer()
        self.timer.attach(self.trainer)

    def _loader(self, seed: int) -> TensorBatchLoader:
        rows = self.args.batch_size * (self.args.warmup + self.args.steps)
        data = make_batches(self.levels, rows, seed)
        return TensorBatchLoader(data, batch_size=self.args.batch_size, shuffle=False, drop_last=True)

    def run_round(self, seed: int) -> list[float]:
        """Warm-up and timed steps on fresh rows; returns the timed steps' milliseconds."""
        self.trainer.data_loader = self._loader(seed)
        self.timer.times = []
        self.trainer.run()
        if len(self.timer.times) != self.args.warmup + self.args.steps:
            raise RuntimeError(f"{self.name}: expected {self.args.warmup + self.args.steps} steps, "
                               f"timed {len(self.timer.times)}.")
        return self.timer.times[self.args.warmup :]

    def state_megabytes(self) -> dict[str, float]:
        """Parameters of the network and (after a step) optimizer state, in MB (10^6 bytes)."""
        params = sum(p.numel() * p.element_size() for p in self.network.parameters())
        state = sum(
            t.numel() * t.element_size()
            for s in self.trainer.optimizer.state.values()
            for t in s.values()
            if isinstance(t, torch.Tensor)
        )
        return {"parameters_mb": params / 1e6, "optimizer_state_mb": state / 1e6}


def rss_mb() -> float:
    """Peak resident set of this process so far, in MB (10^6 bytes; ``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def child_main(args: argparse.Namespace) -> None:
    """Build one configuration, take the warm-up and timed steps once, print the peak memory as JSON."""
    torch.set_num_threads(args.threads)
    after_import = rss_mb()
    config = Config(args.child, args.dense, args, seed=args.seed)
    config.run_round(args.seed + 1)
    print(json.dumps({"peak_rss_mb": rss_mb(), "import_rss_mb": after_import, **config.state_megabytes()}))


def measure_peak(levels: int, dense: bool, args: argparse.Namespace) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--json", "-", "--child", str(levels),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
               "--threads", str(args.threads), "--seed", str(args.seed), "--lr", str(args.lr)]
    if dense:
        command.append("--dense")
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"peak-memory child for {levels} levels (dense={dense}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def time_configs(configs: list[Config], args: argparse.Namespace) -> dict[str, list[float]]:
    """Per configuration, the median of each round's timed steps; the configurations take turns every round."""
    per_round: dict[str, list[float]] = {c.name: [] for c in configs}
    for r in range(args.repeats):
        for config in configs:
            times = config.run_round(seed=args.seed + 1000 * (r + 1) + config.levels % 997)
            per_round[config.name].append(statistics.median(times))
            log(f"round {r + 1}/{args.repeats} {config.name:>15}: median {per_round[config.name][-1]:.2f} ms "
                f"(min {min(times):.2f}, max {max(times):.2f})")
    return per_round


def summarise(levels: Sequence[int], per_round: dict, peaks: dict, states: dict, prefix: str) -> dict:
    names = [f"{prefix}-{n}" for n in levels]
    return {
        "levels": list(levels),
        "step_ms": [statistics.median(per_round[n]) for n in names],
        "step_ms_per_round": [per_round[n] for n in names],
        "peak_rss_mb": [peaks[n]["peak_rss_mb"] for n in names],
        "import_rss_mb": [peaks[n]["import_rss_mb"] for n in names],
        "parameters_mb": [states[n]["parameters_mb"] for n in names],
        "optimizer_state_mb": [states[n]["optimizer_state_mb"] for n in names],
    }


def render_section(results: dict) -> str:
    proto, machine = results["protocol"], results["machine"]
    lines = [
        "## Cluster scale: step time and memory from 10 to 10^6 levels (`MixedModelNet` + `ARMEDTrainer`)",
        "",
        f"`{proto['command']}` — {proto['date']}, {machine['cpu_count']} CPUs, torch {machine['torch']}, "
        f"{machine['threads']} thread(s).",
        "",
        f"One ARMED step (adversary step, then the ELBO step) on a batch of {proto['batch_size']}: MLP fixed part "
        f"{proto['hidden']}, a `subject` factor with random intercept and slopes on {N_INPUTS} inputs (11 correlated "
        f"effects per level) at L levels, a 10-level `site` factor read by the adversary. Sparse: `sparse=True`, batch "
        "KL from the level counts, `LazyAdam(rowwise=True)`. Dense: dense look-ups, `torch.optim.Adam`, the full KL every step. "
        f"Step: median over {proto['repeats']} interleaved rounds of each round's median of {proto['steps']} timed "
        f"steps (after {proto['warmup']} warm-up steps). Peak RSS: `ru_maxrss` of a fresh process per row "
        "(imports, model, optimizer state, the steps).",
        "",
        "| levels | config | step ms | x step at 10 | peak RSS MB | peak - imports MB | parameters MB | optimizer "
        "state MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key in ("sparse", "dense"):
        entry = results.get(key)
        if not entry:
            continue
        base = entry["step_ms"][entry["levels"].index(min(entry["levels"]))]
        for i, n in enumerate(entry["levels"]):
            lines.append(
                f"| {n:,} | {key} | {entry['step_ms'][i]:.2f} | {entry['step_ms'][i] / base:.2f} | "
                f"{entry['peak_rss_mb'][i]:.0f} | {entry['peak_rss_mb'][i] - entry['import_rss_mb'][i]:.0f} | "
                f"{entry['parameters_mb'][i]:.1f} | "
                f"{entry['optimizer_state_mb'][i]:.1f} |"
            )
    ratio, peak = results.get("ratio_1e6_to_10"), results.get("peak_rss_mb_1e6")
    lines.append("")
    if ratio is not None:
        lines.append(
            f"Targets: step at 10^6 levels / step at 10 levels = {ratio:.2f} (target <= {STEP_RATIO_TARGET}, "
            f"{'met' if ratio <= STEP_RATIO_TARGET else 'not met'}); peak RSS at 10^6 levels {peak:.0f} MB "
            f"({peak * 1e6 / 2**20:.0f} MiB) "
            f"(target < {PEAK_MB_TARGET:.0f} MB, {'met' if peak < PEAK_MB_TARGET else 'not met'})."
        )
    else:
        lines.append("Targets need the 10- and 10^6-level rows (not both run).")
    lines.append(
        "\nMB are 10^6 bytes. `peak - imports` leaves out the resident set after the imports (torch, and monai, which "
        "imports pandas, scipy, scikit-learn, matplotlib and nibabel when they are installed); the rest is the model: "
        "the random-effects tables (per level 11 means, 11 scales and 55 Cholesky off-diagonals, float32) and "
        "LazyAdam's first moment of each and one second moment and step count per row."
    )
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=json_output, required=True, help="output JSON path")
    parser.add_argument("--levels", default="10,10000,100000,1000000",
                        type=lambda t: [int(float(v)) for v in t.split(",") if v.strip()])
    parser.add_argument("--repeats", type=positive_int, default=5, help="interleaved rounds")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before each round's timed ones")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dense-baseline", action="store_true",
                        help=f"also time the dense configuration at {DENSE_LEVELS} levels")
    parser.add_argument("--no-results-md", action="store_true", help="do not rewrite the RESULTS.md section")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dense", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.levels) < 2 or args.repeats < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("levels must be >= 2, --repeats and --steps >= 1, --warmup >= 0.")
    return args


def main(argv: Sequence[str] | None = None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child is not None:
        child_main(args)
        return None
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    plan = [(n, False) for n in args.levels] + ([(n, True) for n in DENSE_LEVELS] if args.dense_baseline else [])
    peaks, states = {}, {}
    for n, dense in plan:  # one fresh process each, before the timing process holds every model
        name = f"{'dense' if dense else 'sparse'}-{n}"
        peaks[name] = measure_peak(n, dense, args)
        log(f"peak RSS {name}: {peaks[name]['peak_rss_mb']:.0f} MB (after imports {peaks[name]['import_rss_mb']:.0f})")
    configs = []
    for n, dense in plan:
        build = time.perf_counter()
        configs.append(Config(n, dense, args, seed=args.seed))
        log(f"built {configs[-1].name} in {time.perf_counter() - build:.1f} s")
    per_round = time_configs(configs, args)
    for config in configs:
        states[config.name] = config.state_megabytes()
    results: dict = {
        "levels": list(args.levels),
        "step_ms": [statistics.median(per_round[f"sparse-{n}"]) for n in args.levels],
        "peak_rss_mb": [peaks[f"sparse-{n}"]["peak_rss_mb"] for n in args.levels],
        "sparse": summarise(args.levels, per_round, peaks, states, "sparse"),
    }
    if args.dense_baseline:
        results["dense"] = summarise(DENSE_LEVELS, per_round, peaks, states, "dense")
    if 10 in args.levels and 1_000_000 in args.levels:
        step = dict(zip(args.levels, results["step_ms"]))
        results["ratio_1e6_to_10"] = step[1_000_000] / step[10]
        results["peak_rss_mb_1e6"] = results["peak_rss_mb"][args.levels.index(1_000_000)]
        results["targets"] = {
            "step_ratio_max": STEP_RATIO_TARGET, "step_ratio_met": results["ratio_1e6_to_10"] <= STEP_RATIO_TARGET,
            "peak_mb_max": PEAK_MB_TARGET, "peak_met": results["peak_rss_mb_1e6"] < PEAK_MB_TARGET,
        }
    results["protocol"] = {
        "command": shlex.join(["python", "benchmarks/cluster_scale.py", *argv]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
        "hidden": list(HIDDEN), "inputs": N_INPUTS, "sites": N_SITES, "lr": args.lr, "seed": args.seed,
        "prepare_batch": configs[0].prepare_name,
        "n_train": {c.name: c.n_train for c in configs},
        "step": "ARMEDTrainer iteration, ITERATION_STARTED to ITERATION_COMPLETED (batch fetched before)",
        "peak_rss": "ru_maxrss of a fresh child process per configuration (imports, build, warm-up and timed steps)",
        "total_wall_seconds": time.perf_counter() - start,
    }
    results["machine"] = {"cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    write_json(results, args.json)
    if not args.no_results_md:
        replace_section(RESULTS_MD, SECTION, render_section(results))
    log(render_section(results))
    return results


if __name__ == "__main__":
    main()
