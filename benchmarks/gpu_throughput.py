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
"""Training throughput (images per second) of the MRI bundle's CNN and the segmentation bundle's UNet, conventional
against ARMED, through the package's trainer on a GPU with AMP.

Each candidate trains on synthetic images served the way a MONAI pipeline serves them (``CacheDataset`` with a random
flip, ``ThreadDataLoader``), so the data path is part of the measurement. The candidates run whole epochs in turn
(A, B, C, D, A, ...), after one warm-up epoch each; medians of the images per second and the ARMED / conventional
ratio of the step time are reported, with the GPU utilisation sampled from ``nvidia-smi`` during each epoch.

    python benchmarks/gpu_throughput.py --json benchmarks/out/gpu_throughput.json --amp bf16 --channels-last

``--device cpu --amp none --smoke`` runs the same code with tiny settings (what the tests do); its numbers mean
nothing. Every timed epoch is one ``trainer.run()``, and MONAI's trainer builds a new gradient scaler per run: with
``--amp fp16`` the loss scale restarts every epoch, so prefer ``bf16`` (the default) for the throughput.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import CacheDataset, ThreadDataLoader
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from monai.transforms import RandFlipd
from cli import json_output, positive_int  # noqa: E402
from results_md import replace_section  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from monai_armed.engines import ARMEDTrainer, PrepareBatchCluster
from monai_armed.networks import ARMED, ARMEDCNN, ClusterAdversary, variant_loss_weights
from monai_armed.utils import write_json

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"
N_CLUSTERS = 8
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: candidate -> (bundle, variant)
CANDIDATES = {
    "mri_conventional": ("mri", "conventional"),
    "mri_armed": ("mri", "armed"),
    "segmentation_conventional": ("segmentation", "conventional"),
    "segmentation_armed": ("segmentation", "armed"),
}


def log(message: str) -> None:
    print(message, flush=True)


class ChannelsLastBatch:
    """``PrepareBatchCluster`` whose images are moved to the channels-last memory format (with a channels-last
    network, convolutions then avoid layout conversions on tensor cores)."""

    def __init__(self, prepare: PrepareBatchCluster) -> None:
        self.prepare = prepare

    def __call__(self, batchdata, device=None, non_blocking: bool = False, **kwargs):
        inputs, targets, args, kwargs_out = self.prepare(batchdata, device, non_blocking, **kwargs)
        return inputs.contiguous(memory_format=torch.channels_last), targets, args, kwargs_out


class GPUUtilisation:
    """Samples ``nvidia-smi``'s GPU utilisation (percent) in a background thread while a block runs."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval, self.samples = interval, []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.available = shutil.which("nvidia-smi") is not None

    def _sample(self) -> None:
        # the GPU this process sees first (an index or UUID of CUDA_VISIBLE_DEVICES, which nvidia-smi ignores)
        gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
        query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", f"--id={gpu}"]
        while not self._stop.is_set():
            try:
                self.samples.append(float(subprocess.run(query, capture_output=True, text=True, timeout=5).stdout))
            except (ValueError, subprocess.SubprocessError, OSError):
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> GPUUtilisation:
        if self.available:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def mean(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


def synthetic_data(bundle: str, n: int, size: int, seed: int) -> list[dict]:
    """``n`` images with labels (a class for the MRI CNN, a mask for the UNet) and clusters, as numpy arrays."""
    rng = np.random.default_rng(seed)
    data = []
    for i in range(n):
        image = rng.random((1, size, size), dtype=np.float32)
        label = (image > 0.7).astype(np.int64) if bundle == "segmentation" else np.int64(i % 2)
        data.append({"image": image, "label": label, "cluster": np.int64(i % N_CLUSTERS)})
    return data


def build_trainer(name: str, args: argparse.Namespace, device: torch.device) -> ARMEDTrainer:
    """The bundle's network (as the MRI and segmentation bundles build it) and the package's trainer."""
    bundle, variant = CANDIDATES[name]
    torch.manual_seed(0)
    size = args.size
    if bundle == "mri":
        backbone = ARMEDCNN(2, 1, 1, filters=(16, 32, 32, 64, 64, 128, 128), hidden_channels=128, norm=("batch", {"eps": 1e-3}))
        loss, adversary_hidden, kl_weight = None, (64, 32), 1.0
    else:
        backbone = UNet(2, 1, 2, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=0, norm="instance")
        loss, adversary_hidden, kl_weight = DiceCELoss(to_onehot_y=True, softmax=True), (32, 16), 1.0 / size**2
    network = ARMED.from_variant(variant, backbone, N_CLUSTERS, in_shape=(1, size, size), re_kwargs={"learn_prior_scale": True})
    network = network.to(device)
    if args.channels_last:
        network = network.to(memory_format=torch.channels_last)
    weights = variant_loss_weights(variant, gen_weight=0.1)
    adversary = None
    if weights["adv_weight"]:
        adversary = ClusterAdversary(network.feature_channels, N_CLUSTERS, adversary_hidden).to(device)
    # the cache holds the arrays; the random flip runs on every epoch, as a bundle's random transforms do
    flip = RandFlipd(keys=["image", "label"] if bundle == "segmentation" else ["image"], prob=0.5, spatial_axis=1)
    dataset = CacheDataset(synthetic_data(bundle, args.images, size, seed=0), transform=flip, progress=False)
    loader = ThreadDataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=0, drop_last=True)
    prepare = PrepareBatchCluster()
    amp_dtype = AMP_DTYPES[args.amp]
    return ARMEDTrainer(
        device=device, max_epochs=1, train_data_loader=loader, network=network,
        optimizer=torch.optim.Adam(network.parameters(), 1e-3), loss_function=loss, adversary=adversary,
        kl_weight=kl_weight, prepare_batch=ChannelsLastBatch(prepare) if args.channels_last else prepare,
        decollate=False, epoch_metrics=False, amp=amp_dtype is not None,
        amp_kwargs={"dtype": amp_dtype} if amp_dtype is not None else None,
        me_weight=weights["me_weight"], fe_weight=weights["fe_weight"], adv_weight=weights["adv_weight"],
    )  # fmt: skip


def timed_epoch(trainer: ARMEDTrainer, device: torch.device) -> tuple[float, float | None]:
    """Seconds of one more epoch of ``trainer`` and the GPU utilisation during it."""
    synchronize: Callable[[], None] = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    trainer.state.max_epochs = trainer.state.epoch + 1
    synchronize()
    with GPUUtilisation() as utilisation:
        start = time.perf_counter()
        trainer.run()
        synchronize()
        seconds = time.perf_counter() - start
    return seconds, utilisation.mean()


def measure(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    trainers = {name: build_trainer(name, args, device) for name in args.candidates}
    images = {name: len(trainer.data_loader) * args.batch_size for name, trainer in trainers.items()}
    seconds: dict[str, list[float]] = {name: [] for name in trainers}
    utilisation: dict[str, list[float]] = {name: [] for name in trainers}
    for repeat in range(args.repeats + 1):  # the first round warms up (cuDNN autotuning, allocator) and is not kept
        for name, trainer in trainers.items():
            took, busy = timed_epoch(trainer, device)
            if repeat:
                seconds[name].append(took)
                if busy is not None:
                    utilisation[name].append(busy)
            log(f"round {repeat}: {name} {images[name] / took:.1f} images/s" + (f", GPU {busy:.0f}%" if busy is not None else ""))
    results: dict = {"candidates": {}}
    for name in trainers:
        median = float(np.median(seconds[name]))
        results["candidates"][name] = {
            "images_per_second": images[name] / median,
            "seconds_per_epoch": seconds[name],
            "gpu_utilisation_percent": float(np.median(utilisation[name])) if utilisation[name] else None,
        }
    for bundle in ("mri", "segmentation"):
        pair = (f"{bundle}_armed", f"{bundle}_conventional")
        if all(p in results["candidates"] for p in pair):
            armed, conventional = (results["candidates"][p]["images_per_second"] for p in pair)
            results[f"{bundle}_step_ratio"] = conventional / armed  # step time ARMED / conventional
    return results


def render_section(results: dict) -> str:
    p = results["protocol"]
    lines = [
        "## GPU throughput (MRI CNN and segmentation UNet, conventional vs ARMED)",
        "",
        f"`{p['command']}` — {p['date']}, {p['device_name']}, torch {p['torch']}; AMP {p['amp']}, channels-last "
        f"{p['channels_last']}, batch {p['batch_size']}, {p['size']} x {p['size']} images, {p['repeats']} interleaved "
        "epochs after a warm-up (CacheDataset + ThreadDataLoader).",
        "",
        "| candidate | images/s | GPU utilisation % |",
        "|---|---|---|",
    ]
    for name, c in results["candidates"].items():
        busy = "n/a" if c["gpu_utilisation_percent"] is None else f"{c['gpu_utilisation_percent']:.0f}"
        lines.append(f"| {name} | {c['images_per_second']:.1f} | {busy} |")
    ratios = [f"{b} {results[f'{b}_step_ratio']:.2f}" for b in ("mri", "segmentation") if f"{b}_step_ratio" in results]
    if ratios:
        lines += ["", "Step time ARMED / conventional: " + ", ".join(ratios) + "."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=json_output, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--amp", choices=sorted(AMP_DTYPES), default="bf16")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--size", type=int, default=96, help="image side (the bundles train on 96 x 96)")
    parser.add_argument("--images", type=int, default=2048, help="synthetic images per candidate and epoch")
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--candidates", default=",".join(CANDIDATES), help=f"subset of {', '.join(CANDIDATES)}")
    parser.add_argument("--smoke", action="store_true", help="tiny settings: checks the code path, not the speed")
    parser.add_argument("--section", default="gpu-throughput")
    parser.add_argument("--no-results-md", action="store_true")
    args = parser.parse_args(argv)
    args.candidates = [c.strip() for c in args.candidates.split(",") if c.strip()]
    unknown = sorted(set(args.candidates) - set(CANDIDATES))
    if unknown:
        parser.error(f"unknown candidate(s) {unknown}; choose from {list(CANDIDATES)}.")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU; use --device cpu --amp none --smoke to check the code path.")
    if args.amp != "none" and not args.device.startswith("cuda"):
        parser.error("--amp needs a CUDA device (the trainers' autocast is CUDA's).")
    if args.smoke:
        args.batch_size, args.size, args.images, args.repeats = 4, 64, 8, 1
    if args.images < args.batch_size:
        parser.error(f"--images {args.images} is fewer than one batch of --batch-size {args.batch_size}.")
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    results = measure(args)
    results["protocol"] = {
        "command": shlex.join(["python", "benchmarks/gpu_throughput.py", *argv]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU",
        "torch": torch.__version__, "amp": args.amp, "channels_last": args.channels_last,
        "batch_size": args.batch_size, "size": args.size, "images": args.images, "repeats": args.repeats,
        "smoke": args.smoke,
    }  # fmt: skip
    write_json(results, args.json)
    if not args.no_results_md and not args.smoke:
        replace_section(RESULTS_MD, args.section, render_section(results))
    log(render_section(results))
    return results


if __name__ == "__main__":
    main()
