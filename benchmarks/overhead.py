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
"""Training-loop overhead: the spiral ARMED fold through the package's ``ARMEDTrainer`` against a minimal hand-written
eager PyTorch loop with the same maths and batch order, interleaved in one process.

The minimal loop (kept here, not in the package) starts from the package network's own initial weights, draws the
random effects' noise in the same order and takes the same steps: the paper's sequential update (the adversary's step
on the detached features, then the main step against the frozen adversary), the paper's objective (BCE of the mixed-
and fixed-effects logits, minus ``gen_weight`` times the adversary's cross-entropy, plus 1e-5 times the summed KL) and
fused Adam. A third candidate, the package's own network, adversary and losses in a plain loop without an engine, is
the oracle of a trainer that costs nothing: it splits the package's overhead into what the modules cost and what the
trainer adds. A fourth, the package's trainer taking the minimal loop's step, is the other oracle, of modules that cost
nothing: the floor that any faster module code (a functional fast path) could reach inside this trainer. After 10 steps
from the same state (the fold's first 320 rows) all four hold exactly the same parameters (``max_parameter_difference``):
the maths are the same. Then they run whole folds (10 epochs, batch 32) in turn, A, B, C, D, A, B, C, D ...; the medians
and their ratios are reported. ``--mri`` also times the MRI bundle's CNN step, ARMED against
conventional, interleaved the same way.

    python benchmarks/overhead.py --json benchmarks/out/overhead.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.utils import CommonKeys
from bundle_runner import interleaved_step_seconds  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from cli import json_output, positive_int  # noqa: E402
from results_md import replace_section  # noqa: E402
from spirals import BATCH_SIZE, EPOCHS, KL_WEIGHT, MODELS, N_CLUSTERS, adam, build_model, fold_splits, make_data, subset

from monai_armed.data import TensorBatchLoader
from monai_armed.engines import ARMEDTrainer, PrepareBatchCluster
from monai_armed.losses import LogitClassificationLoss
from monai_armed.utils import batch_checks, write_json

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"


def log(message: str) -> None:
    print(message, flush=True)


def package_trainer(
    network, adversary, weights, train: dict, loader_seed: int, epochs: int, cls: type = ARMEDTrainer, **extra
) -> ARMEDTrainer:
    """The spiral benchmark's ``ARMEDTrainer`` for the paper's ARMED (``benchmarks/spirals.py``); ``cls`` and ``extra``:
    a subclass and its own arguments."""
    return cls(
        device="cpu",
        max_epochs=epochs,
        train_data_loader=TensorBatchLoader(train, batch_size=BATCH_SIZE, shuffle=True, seed=loader_seed),
        network=network,
        optimizer=adam(network.parameters()),
        adversary=adversary,
        adv_optimizer=adam(adversary.parameters()),
        kl_weight=KL_WEIGHT * len(train["label"]),
        prepare_batch=PrepareBatchCluster("features", check_finite=True),
        decollate=False,
        epoch_metrics=False,
        **weights,
        **extra,
    )


class EagerLoop:
    """A plain eager loop over the fold's rows, in the trainer's batch order (subclasses give the step)."""

    def __init__(self, train: dict, loader_seed: int) -> None:
        self.x = torch.as_tensor(train["features"])
        self.c = torch.as_tensor(train["cluster"]).long()
        self.generator = torch.Generator().manual_seed(loader_seed)

    def step(self, x: torch.Tensor, y: torch.Tensor, c: torch.Tensor) -> None:
        raise NotImplementedError

    def run(self, epochs: int) -> None:
        n = self.x.shape[0]
        for _ in range(epochs):
            order = torch.randperm(n, generator=self.generator)
            for start in range(0, n, BATCH_SIZE):
                index = order[start : start + BATCH_SIZE]
                self.step(self.x[index], self.y[index], self.c[index])


class MinimalLoop(EagerLoop):
    """The same model and steps as ``package_trainer``, written as a plain eager loop on the same tensors.

    It takes the package network's and adversary's parameters as plain tensors (copies), so both start alike.
    """

    def __init__(self, network, adversary, weights: dict, train: dict, loader_seed: int) -> None:
        super().__init__(train, loader_seed)
        net, adv = copy.deepcopy(network), copy.deepcopy(adversary)
        self.hidden = [(layer[0].weight, layer[0].bias) for layer in net.hidden]
        self.out = (net.out.weight, net.out.bias)
        re = net.random_effects
        self.loc, self.rho, self.log_prior = re.loc, re.rho, re.log_prior_scale.detach()
        self.inv_two_prior_var = 0.5 * torch.exp(-2.0 * self.log_prior)  # 1 / (2 prior^2), the prior being fixed
        self.slope_end = net.re_groups["slope_hidden"][1]
        self.adv_layers = [(layer[0].weight, layer[0].bias) for layer in adv.hidden] + [(adv.out.weight, adv.out.bias)]
        self.params = [p for pair in self.hidden for p in pair] + list(self.out) + [self.loc, self.rho]
        self.adv_params = [p for pair in self.adv_layers for p in pair]
        self.optimizer, self.adv_optimizer = adam(self.params), adam(self.adv_params)
        self.me_weight, self.fe_weight, self.adv_weight = weights["me_weight"], weights["fe_weight"], weights["adv_weight"]
        self.y = torch.as_tensor(train["label"]).reshape(-1).float()
        self.kl_weight = KL_WEIGHT

    def adversary(self, features: list[torch.Tensor]) -> torch.Tensor:
        h = torch.cat(features, dim=1)
        for w, b in self.adv_layers[:-1]:
            h = F.relu(F.linear(h, w, b))
        return F.linear(h, *self.adv_layers[-1])

    def step(self, x: torch.Tensor, y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h, features = x, []
        for w, b in self.hidden:
            h = F.relu(F.linear(h, w, b))
            features.append(h)
        fe = F.linear(h, *self.out)[:, 0]
        loc = self.loc[c]
        u = loc + (F.softplus(self.rho[c]) + 1e-5) * torch.randn_like(loc)
        me = fe + (h * u[:, : self.slope_end]).sum(1) + u[:, self.slope_end]
        scale = F.softplus(self.rho) + 1e-5
        kl = ((self.log_prior - scale.log()) + (scale.square() + self.loc.square()) * self.inv_two_prior_var - 0.5).sum()
        bce = F.binary_cross_entropy_with_logits
        task = self.me_weight * bce(me, y) + self.fe_weight * bce(fe, y)
        # the adversary's step on the detached features
        self.adv_optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(self.adversary([f.detach() for f in features]), c).backward()
        self.adv_optimizer.step()
        # the main step against the updated, frozen adversary
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.adv_params:
            p.requires_grad_(False)
        loss = task - self.adv_weight * F.cross_entropy(self.adversary(features), c) + self.kl_weight * kl
        loss.backward()
        for p in self.adv_params:
            p.requires_grad_(True)
        self.optimizer.step()
        return loss


class MinimalStepTrainer(ARMEDTrainer):
    """The package's trainer (its engine, loader, batch preparation, events and output) taking the minimal loop's step:
    the oracle of modules that cost nothing. It logs the step's loss, as the package's own step does."""

    def __init__(self, minimal: MinimalLoop, **kwargs) -> None:
        super().__init__(**kwargs)
        self.minimal = minimal

    def _train_step(
        self, inputs: torch.Tensor, targets: torch.Tensor, cluster: torch.Tensor, zero_grad: bool, step: bool
    ) -> None:
        loss = self.minimal.step(inputs, targets.reshape(-1).to(inputs.dtype), cluster)
        self.state.output[CommonKeys.LOSS] = loss.detach()


def minimal_step_trainer(network, adversary, weights, train: dict, loader_seed: int, epochs: int) -> MinimalStepTrainer:
    """``package_trainer``'s engine around a :class:`MinimalLoop` on copies of ``network`` and ``adversary``."""
    minimal = MinimalLoop(network, adversary, weights, train, loader_seed)
    return package_trainer(network, adversary, weights, train, loader_seed, epochs, MinimalStepTrainer, minimal=minimal)


class ModuleLoop(EagerLoop):
    """The package's own network, adversary and losses in a plain eager loop without an engine: the oracle of a
    trainer that costs nothing. The package trainer's ratio to it is the trainer's overhead; its ratio to
    :class:`MinimalLoop` is what the modules cost (module calls, checks, the general code paths)."""

    def __init__(self, network, adversary, weights: dict, train: dict, loader_seed: int) -> None:
        super().__init__(train, loader_seed)
        self.network, self.adversary = network, adversary
        self.optimizer, self.adv_optimizer = adam(network.parameters()), adam(adversary.parameters())
        self.adv_params = list(adversary.parameters())
        self.me_weight, self.fe_weight, self.adv_weight = weights["me_weight"], weights["fe_weight"], weights["adv_weight"]
        self.loss, self.adv_loss = LogitClassificationLoss(), torch.nn.CrossEntropyLoss(ignore_index=-1)
        self.y = torch.as_tensor(train["label"]).reshape(-1)
        self.kl_weight = KL_WEIGHT

    def step(self, x: torch.Tensor, y: torch.Tensor, c: torch.Tensor) -> None:
        out = self.network.forward_armed(x, c)
        task = self.me_weight * self.loss(out.pred, y) + self.fe_weight * self.loss(out.pred_fe, y)
        self.adv_optimizer.zero_grad(set_to_none=True)
        self.adv_loss(self.adversary([f.detach() for f in out.features]), c).backward()
        self.adv_optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.adv_params:
            p.requires_grad_(False)
        loss = task - self.adv_weight * self.adv_loss(self.adversary(out.features), c) + self.kl_weight * out.kl
        loss.backward()
        for p in self.adv_params:
            p.requires_grad_(True)
        self.optimizer.step()

    def run(self, epochs: int) -> None:
        with batch_checks(False):  # as the trainer after its first batch
            super().run(epochs)


def max_parameter_difference(train: dict, seed: int) -> float:
    """The four candidates one epoch of ``train`` from the same state and the same global random state: the largest
    parameter difference from the trainer's (0 when every operation matches; over a whole fold the KL weight,
    ``1e-5 * n / n`` in the trainer, rounds differently and training amplifies that to about 1e-3)."""
    network, adversary, weights = build_model(MODELS["armed"], N_CLUSTERS, seed)
    minimal = MinimalLoop(network, adversary, weights, train, loader_seed=0)
    modules = ModuleLoop(copy.deepcopy(network), copy.deepcopy(adversary), weights, train, loader_seed=0)
    stepper = minimal_step_trainer(network, adversary, weights, train, loader_seed=0, epochs=1)
    trainer = package_trainer(network, adversary, weights, train, loader_seed=0, epochs=1)
    for runner in (trainer, minimal, modules, stepper):
        torch.manual_seed(123)
        runner.run(1) if isinstance(runner, EagerLoop) else runner.run()
    pairs = []
    for loop in (minimal, stepper.minimal):
        pairs += [(network.hidden[i][0].weight, loop.hidden[i][0]) for i in range(len(loop.hidden))]
        pairs += [(network.out.weight, loop.out[0]), (network.random_effects.loc, loop.loc)]
        pairs += [(network.random_effects.rho, loop.rho), (adversary.out.weight, loop.adv_layers[-1][0])]
    pairs += list(zip(network.parameters(), modules.network.parameters()))
    pairs += list(zip(adversary.parameters(), modules.adversary.parameters()))
    return max(float((a.detach() - b.detach()).abs().max()) for a, b in pairs)


def spiral_fold_times(train: dict, seed: int, repeats: int) -> dict[str, list[float]]:
    """Seconds of a whole fold (``EPOCHS`` epochs) per candidate, alternating the candidates."""
    seconds: dict[str, list[float]] = {"package": [], "minimal": [], "modules": [], "minimal_step_trainer": []}
    trainers = {"package": package_trainer, "minimal_step_trainer": minimal_step_trainer}
    for _ in range(repeats):
        for name in seconds:
            network, adversary, weights = build_model(MODELS["armed"], N_CLUSTERS, seed)
            if name in trainers:
                runner = trainers[name](network, adversary, weights, train, loader_seed=0, epochs=EPOCHS)
                start = time.perf_counter()
                runner.run()
            else:
                loop = (MinimalLoop if name == "minimal" else ModuleLoop)(network, adversary, weights, train, 0)
                start = time.perf_counter()
                loop.run(EPOCHS)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def mri_step_times(repeats: int, iterations: int) -> dict[str, list[float]]:
    """Seconds per training step of the MRI bundle's CNN (batch 32, 96 x 96), ARMED and conventional, alternating."""
    from monai_armed.networks import ARMED, ARMEDCNN, ClusterAdversary, variant_loss_weights

    g = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.rand(32 * iterations, 1, 96, 96, generator=g),
        "label": torch.randint(0, 2, (32 * iterations,), generator=g),
        "cluster": torch.arange(32 * iterations) % 8,
    }
    trainers = {}
    for variant in ("conventional", "armed"):
        torch.manual_seed(0)
        backbone = ARMEDCNN(2, 1, 1, filters=(16, 32, 32, 64, 64, 128, 128), hidden_channels=128, norm=("batch", {"eps": 1e-3}))
        network = ARMED.from_variant(variant, backbone, 8, in_shape=(1, 96, 96), re_kwargs={"learn_prior_scale": True})
        weights = variant_loss_weights(variant, gen_weight=0.1)
        adversary = ClusterAdversary(network.feature_channels, 8, (64, 32)) if weights["adv_weight"] else None
        trainers[variant] = ARMEDTrainer(
            device="cpu", max_epochs=1, train_data_loader=TensorBatchLoader(batch, batch_size=32), network=network,
            optimizer=torch.optim.NAdam(network.parameters(), 1e-3), adversary=adversary, decollate=False,
            epoch_metrics=False, **weights,
        )  # fmt: skip
    return interleaved_step_seconds(trainers, repeats, iterations)


def render_section(results: dict) -> str:
    s, p = results["spirals"], results["protocol"]
    lines = [
        "## Training-loop overhead (spiral ARMED fold, package trainer vs a minimal eager loop)",
        "",
        f"`{p['command']}` — {p['date']}, {results['machine']['cpu_count']} CPUs, torch {results['machine']['torch']}, 1 thread.",
        "",
        f"Fold 1 of the spirals (train {s['n_train']} rows), the paper's ARMED (4-4-4 ReLU MLP, random slopes on the last "
        f"hidden layer and intercept, 4-4 adversary, sequential update), {EPOCHS} epochs of batch {BATCH_SIZE}, fused Adam; "
        f"{p['repeats']} interleaved repeats. Same maths: after 10 steps from the same state the largest parameter "
        f"difference is {s['max_parameter_difference']:.1e}.",
        "",
        f"Seconds per fold, median: package {s['median_seconds']['package']:.2f}, minimal loop "
        f"{s['median_seconds']['minimal']:.2f}; ratio **{s['ratio']:.2f}** "
        f"({1000 * s['median_seconds']['package'] / s['iterations']:.2f} vs "
        f"{1000 * s['median_seconds']['minimal'] / s['iterations']:.2f} ms per iteration).",
        "",
        f"Headroom: the package's own network, adversary and losses in a plain loop without an engine (the oracle of a "
        f"trainer that costs nothing) take {s['median_seconds']['modules']:.2f} s, **{s['modules_ratio']:.2f}x** the "
        f"minimal loop; the trainer adds {s['trainer_ratio']:.2f}x to that. The modules' share is the price of module "
        "calls, argument checks and general code paths (several grouping factors, unseen clusters, covariance "
        "choices); the minimal loop has none of them. The other oracle, the package's trainer taking the minimal "
        f"loop's step (modules that cost nothing), takes {s['median_seconds']['minimal_step_trainer']:.2f} s, "
        f"**{s['minimal_step_trainer_ratio']:.2f}x**: the floor of any faster module code inside this trainer.",
    ]
    if "mri" in results:
        m = results["mri"]
        lines += [
            "",
            f"MRI bundle CNN (batch 32, 96 x 96, NAdam): ARMED {1000 * m['median_seconds']['armed']:.0f} ms, conventional "
            f"{1000 * m['median_seconds']['conventional']:.0f} ms per step, ratio **{m['ratio']:.2f}**.",
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=json_output, required=True)
    parser.add_argument("--seed", type=int, default=283, help="model seed (the authors' notebook's)")
    parser.add_argument("--repeats", type=positive_int, default=7)
    parser.add_argument("--mri", action="store_true", help="also time the MRI bundle's CNN step")
    parser.add_argument("--section", default="overhead")
    parser.add_argument("--no-results-md", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = make_data()
    train_index, _ = fold_splits(data)[0]
    train = subset(data, train_index)
    difference = max_parameter_difference(subset(data, train_index[: 10 * BATCH_SIZE]), args.seed)
    log(f"largest parameter difference after 10 steps: {difference:.2e}")
    seconds = spiral_fold_times(train, args.seed, args.repeats)
    medians = {k: float(np.median(v)) for k, v in seconds.items()}
    iterations = EPOCHS * -(-len(train["label"]) // BATCH_SIZE)
    results = {
        "spirals": {
            "n_train": len(train["label"]),
            "iterations": iterations,
            "max_parameter_difference": difference,
            "seconds": seconds,
            "median_seconds": medians,
            "ratio": medians["package"] / medians["minimal"],
            "modules_ratio": medians["modules"] / medians["minimal"],
            "trainer_ratio": medians["package"] / medians["modules"],
            "minimal_step_trainer_ratio": medians["minimal_step_trainer"] / medians["minimal"],
        },
        "protocol": {"repeats": args.repeats, "seed": args.seed, "command": shlex.join(["python", "benchmarks/overhead.py", *argv]),
                     "date": datetime.datetime.now().isoformat(timespec="seconds")},  # fmt: skip
        "machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__},
    }
    if args.mri:
        mri = mri_step_times(args.repeats, 3)
        mri_medians = {k: float(np.median(v)) for k, v in mri.items()}
        results["mri"] = {"seconds": mri, "median_seconds": mri_medians, "ratio": mri_medians["armed"] / mri_medians["conventional"]}
    write_json(results, args.json)
    if not args.no_results_md:
        replace_section(RESULTS_MD, args.section, render_section(results))
    log(render_section(results))
    return results


if __name__ == "__main__":
    main()
