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

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["cluster_groups"]


def cluster_groups(
    cluster: torch.Tensor | np.ndarray,
    n_samples: int,
    n_clusters: int | None = None,
    cluster_names: Sequence[str] | None = None,
) -> list[tuple[str, np.ndarray]]:
    """The rows of each cluster for a per-cluster table: ``(name, boolean row mask)`` for every cluster index
    ``0..n_clusters-1`` with rows, then ``("unseen", ...)`` for the ``-1`` rows if there are any.

    Args:
        cluster: ``(N,)`` cluster indices, ``-1`` for unseen clusters.
        n_samples: ``N``, checked against ``cluster``.
        n_clusters: number of seen clusters (default: largest index + 1).
        cluster_names: names of the clusters (default: the indices as text).

    Raises:
        ValueError: another number of indices than samples, of names than clusters, or an index ``>= n_clusters``.

    Example::

        for name, rows in cluster_groups(cluster, len(y), cluster_names=["site_a", "site_b"]):
            table[name] = float(y[rows].mean())
    """
    index = np.asarray(cluster.detach().cpu() if isinstance(cluster, torch.Tensor) else cluster).reshape(-1)
    if index.shape[0] != n_samples:
        raise ValueError(f"got {index.shape[0]} cluster indices for {n_samples} samples.")
    index = index.astype(np.int64)
    n_clusters = n_clusters if n_clusters is not None else int(index.max(initial=-1)) + 1
    names = list(cluster_names) if cluster_names is not None else [str(i) for i in range(n_clusters)]
    if len(names) != n_clusters:
        raise ValueError(f"got {len(names)} cluster names for {n_clusters} clusters.")
    _check_cluster_range(int(index.max(initial=-1)), n_clusters)
    groups = [(name, index == slot) for slot, name in enumerate(names)] + [("unseen", index < 0)]
    return [(name, rows) for name, rows in groups if rows.any()]


def _check_cluster_range(largest: int, n_clusters: int) -> None:
    """Refuse a largest cluster index beyond the table of ``n_clusters`` seen clusters (negative ones are unseen)."""
    if largest >= n_clusters:
        raise ValueError(
            f"cluster index {largest} is out of range for {n_clusters} clusters (0..{n_clusters - 1}, -1: unseen); "
            "give n_clusters the number of seen clusters."
        )
