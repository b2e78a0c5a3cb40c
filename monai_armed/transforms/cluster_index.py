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

import json
import logging
import os
import re
from collections.abc import Hashable, Iterable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from monai_armed.utils import atomic_open, cluster_id, is_missing_value

__all__ = ["ClusterVocabulary", "ClusterIndexd", "ClusterIndexD", "ClusterIndexDict"]

logger = logging.getLogger(__name__)
_INTEGER = re.compile(r"-?[0-9]+")


def _sort_ids(names: set[str]) -> list[str]:
    """Numeric order when every id is an integer literal and no two have the same value (``"01"`` and ``"1"`` do),
    text order otherwise."""
    values = {int(n) for n in names if _INTEGER.fullmatch(n)}
    return sorted(names, key=int) if len(values) == len(names) else sorted(names)


def _number(name: str) -> float | None:
    try:
        return float(name)
    except ValueError:
        return None


class ClusterVocabulary:
    """Maps raw cluster ids (site, scanner, batch, subject: strings or numbers) to indices ``0..C-1``.

    Built from the training data, saved as JSON beside the checkpoint and loaded for evaluation and inference, so
    that index ``c`` means the same cluster everywhere. Ids are compared as text (:func:`monai_armed.utils.cluster_id`):
    ``3 == "3"``, but ``"01" != "1"`` and ``3.0 != "3"``. Unknown ids map to ``-1`` (unseen: fixed effects only);
    a missing id (empty, NaN, ``None``) raises a ``ValueError``.

    Args:
        clusters: the raw ids in index order (duplicates are not allowed).

    Example::

        vocab = ClusterVocabulary.from_ids(["siteB", "siteA", "siteB"])   # sorted: siteA -> 0, siteB -> 1
        vocab.index("siteB"), vocab.index("siteZ")                        # (1, -1)
        vocab.save("models/clusters.json")
        vocab = ClusterVocabulary.load("models/clusters.json")
    """

    def __init__(self, clusters: Sequence[object]) -> None:
        names = [cluster_id(c, f"cluster vocabulary entry {i}") for i, c in enumerate(clusters)]
        if not names:
            raise ValueError("a cluster vocabulary needs at least one cluster.")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate cluster ids in vocabulary: {duplicates}.")
        self.clusters = names
        self._index = {n: i for i, n in enumerate(names)}

    @classmethod
    def from_ids(cls, ids: Iterable[object]) -> ClusterVocabulary:
        """Vocabulary of the distinct ids, sorted: numerically when all ids are integers of distinct values
        (``1, 2, 10``), as text otherwise (``"001", "01", "1"``; ``"a", "b"``)."""
        return cls(_sort_ids({cluster_id(i) for i in ids}))

    @classmethod
    def from_datalist(cls, datalist: Sequence[Mapping], key: str = "cluster") -> ClusterVocabulary:
        """Vocabulary of the ids under ``key`` in a datalist; raises ``KeyError`` naming the first item without it."""
        for i, item in enumerate(datalist):
            if key not in item:
                raise KeyError(f"datalist item {i} has no cluster key {key!r}; keys present: {sorted(item)}.")
        return cls.from_ids(cluster_id(item[key], f"datalist item {i}, key {key!r}") for i, item in enumerate(datalist))

    @classmethod
    def load(cls, path: str | os.PathLike) -> ClusterVocabulary:
        """Read a vocabulary saved by :meth:`save`."""
        try:
            with open(path) as f:
                content = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"cluster vocabulary file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"cluster vocabulary {path} is not valid JSON: {e}") from None
        if not isinstance(content, dict) or not isinstance(content.get("clusters"), list):
            raise ValueError(f"cluster vocabulary {path} must be a JSON object with a 'clusters' list.")
        return cls(content["clusters"])

    def save(self, path: str | os.PathLike) -> None:
        """Write the vocabulary as JSON (atomically: an existing file is replaced only when the write succeeded)."""
        with atomic_open(path) as f:
            json.dump({"clusters": self.clusters, "n_clusters": len(self)}, f, indent=2)

    def __len__(self) -> int:
        return len(self.clusters)

    def __contains__(self, raw: object) -> bool:
        return not is_missing_value(raw) and cluster_id(raw) in self._index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ClusterVocabulary) and self.clusters == other.clusters

    def index(self, raw: object) -> int:
        """Index of a raw id, ``-1`` if it is not in the vocabulary; a missing id raises a ``ValueError``."""
        return self._index.get(cluster_id(raw), -1)

    def lookalikes(self, raw: object) -> list[str]:
        """The ids in the vocabulary that write the same number as ``raw`` differently (``"3.0"`` or ``"03"`` for
        ``"3"``): the usual reason a known cluster shows up as unseen.

        Example::

            ClusterVocabulary(["03", "4"]).lookalikes(3)   # ["03"]
        """
        name = cluster_id(raw)
        value = _number(name)
        if value is None:
            return []
        return [c for c in self.clusters if c != name and _number(c) == value]

    def check_n_clusters(self, n_clusters: int, source: str = "the model") -> None:
        """Raise a ``ValueError`` if ``source`` was built for another number of clusters than this vocabulary has."""
        if n_clusters != len(self):
            raise ValueError(
                f"{source} has {n_clusters} clusters but the cluster vocabulary has {len(self)}: the checkpoint and "
                "the vocabulary come from different trainings."
            )


class ClusterIndexd(MapTransform):
    """Dictionary transform: replaces raw cluster ids with vocabulary indices (``int64``; unknown ids -> ``-1``).

    Every distinct unknown id is logged once (a warning: those samples get fixed effects only, or the Z-predictor's
    inferred membership; the warning names a vocabulary id that writes the same number differently, such as ``"03"``
    for ``"3"``); ``n_unseen`` counts the samples. A missing key raises a ``KeyError`` naming it, and a missing value
    (``None``, NaN, empty) a ``ValueError``, unless ``missing_as_unseen`` (or ``allow_missing_keys``, which skips the
    key: then a batch that mixes items with and without it cannot be collated).

    Args:
        keys: key(s) of the raw cluster id.
        vocabulary: a :class:`ClusterVocabulary` or the path of its JSON file.
        output_key: where to write the index (default: replace the raw id in place); only with a single key.
        raw_key_suffix: if set, keep the raw id under ``key + raw_key_suffix`` (e.g. ``"_id"``).
        allow_missing_keys: skip samples without the key instead of raising.
        missing_as_unseen: give an item without a cluster id (no key, or a missing value) the index ``-1``, like an
            unseen cluster, so a batch may mix items with and without one (inference). ``ARMEDEvaluator``'s
            ``observed`` mode then uses the Z-predictor's inferred membership for them, else fixed effects. Logged
            once; ``n_missing`` counts the items.

    Example::

        t = ClusterIndexd(keys="cluster", vocabulary="models/clusters.json")
        t({"features": x, "cluster": "siteA"})["cluster"]      # tensor(0)
        t = ClusterIndexd(keys="cluster", vocabulary="models/clusters.json", missing_as_unseen=True)
        t({"features": x})["cluster"]                          # tensor(-1)
    """

    def __init__(
        self,
        keys: KeysCollection,
        vocabulary: ClusterVocabulary | str | os.PathLike,
        output_key: str | None = None,
        raw_key_suffix: str | None = None,
        allow_missing_keys: bool = False,
        missing_as_unseen: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if output_key is not None and len(self.keys) > 1:
            raise ValueError(f"output_key needs a single key, got keys {list(self.keys)}.")
        self.vocabulary = (
            vocabulary if isinstance(vocabulary, ClusterVocabulary) else ClusterVocabulary.load(vocabulary)
        )
        self.output_key, self.raw_key_suffix = output_key, raw_key_suffix
        self.missing_as_unseen = missing_as_unseen
        self.n_unseen = self.n_missing = 0
        self._reported: set[str] = set()

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        keys = self.keys if self.missing_as_unseen else self.key_iterator(d)
        for key in keys:
            if self.missing_as_unseen and (key not in d or is_missing_value(d[key])):
                self._report_missing(key)
                index = -1
            else:
                raw = d[key]
                index = self.vocabulary.index(cluster_id(raw, f"key {key!r}"))
                if index < 0:
                    self._report_unseen(raw)
                if self.raw_key_suffix:
                    d[f"{key}{self.raw_key_suffix}"] = raw
            d[self.output_key or key] = torch.tensor(index, dtype=torch.int64)
        return d

    def _report_unseen(self, raw: object) -> None:
        self.n_unseen += 1
        name = cluster_id(raw)
        if name not in self._reported:
            self._reported.add(name)
            twins = self.vocabulary.lookalikes(name)
            hint = f" The vocabulary has {twins}: ids are compared as text." if twins else ""
            logger.warning(
                f"cluster {name!r} is not in the vocabulary ({len(self.vocabulary)} clusters): treated as unseen (-1)."
                + hint
            )

    def _report_missing(self, key: Hashable) -> None:
        self.n_missing += 1
        if self.n_missing == 1:
            logger.warning(
                f"an item has no cluster id under {key!r}: items without one are treated as unseen (-1), so they get "
                "the Z-predictor's inferred membership (ARMEDEvaluator, observed mode) or else fixed effects only; "
                "ClusterIndexd.n_missing counts them."
            )


ClusterIndexD = ClusterIndexDict = ClusterIndexd
