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
from collections import Counter
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from monai_armed.utils import atomic_open, cluster_id, is_missing_value

__all__ = ["ClusterVocabulary", "ClusterVocabularies", "ClusterIndexd", "ClusterIndexD", "ClusterIndexDict"]

logger = logging.getLogger(__name__)
_INTEGER = re.compile(r"-?[0-9]+")


def _sort_ids(names: set[str]) -> list[str]:
    """Numeric order when every id is an integer literal and no two have the same value (``"01"`` and ``"1"`` do),
    text order otherwise."""
    values = {int(n) for n in names if _INTEGER.fullmatch(n)}
    return sorted(names, key=int) if len(values) == len(names) else sorted(names)


def _read_json(path: str | os.PathLike) -> object:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"cluster vocabulary file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"cluster vocabulary {path} is not valid JSON: {e}") from None


def _is_several(content: object) -> bool:
    """Whether a vocabulary file's content is the several-factor form written by :meth:`ClusterVocabularies.save`."""
    return isinstance(content, dict) and "factors" in content and "clusters" not in content


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
        duplicates = sorted(n for n, count in Counter(names).items() if count > 1)
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
        content = _read_json(path)
        if _is_several(content):
            raise ValueError(
                f"cluster vocabulary {path} holds several grouping factors {sorted(content['factors'])}: read it with "
                "ClusterVocabularies.load(path), or ClusterVocabularies.load(path)[factor] for one of them."
            )
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


class ClusterVocabularies(Mapping[str, ClusterVocabulary]):
    """One :class:`ClusterVocabulary` per grouping factor (crossed or nested: ``site`` and ``subject``), in order.

    A read-only mapping ``factor -> ClusterVocabulary``; the factor order is kept (the first factor is the default of
    ``ARMEDTrainer.adversary_factor`` and of ``ARMEDEvaluator``'s ``inferred_factor``). Saved as one JSON file beside
    the checkpoint, ``{"factors": {factor: {"clusters": [...], "n_clusters": C}}}``; :meth:`load` also reads a
    single-factor file written by :meth:`ClusterVocabulary.save`, as one factor named ``key``.

    Args:
        vocabularies: ``{factor: ClusterVocabulary}`` (or ``{factor: [raw ids in index order]}``).

    Example::

        vocabs = ClusterVocabularies.from_datalist(train_list, keys=["site", "subject"])
        vocabs.n_levels                                  # {"site": 4, "subject": 20}
        vocabs.save("models/clusters.json")
        t = ClusterIndexd(keys=["site", "subject"], vocabulary=ClusterVocabularies.load("models/clusters.json"))
    """

    def __init__(self, vocabularies: Mapping[str, ClusterVocabulary | Sequence[object]]) -> None:
        if not vocabularies:
            raise ValueError("ClusterVocabularies needs at least one grouping factor.")
        self._vocabularies: dict[str, ClusterVocabulary] = {}
        for factor, vocab in vocabularies.items():
            if not isinstance(factor, str) or not factor:
                raise ValueError(f"grouping factor names must be non-empty strings, got {factor!r}.")
            self._vocabularies[factor] = vocab if isinstance(vocab, ClusterVocabulary) else ClusterVocabulary(vocab)

    @classmethod
    def from_datalist(cls, datalist: Sequence[Mapping], keys: str | Sequence[str]) -> ClusterVocabularies:
        """The vocabulary of every key (one factor each) in a datalist, each built as
        :meth:`ClusterVocabulary.from_datalist`."""
        keys = [keys] if isinstance(keys, str) else list(keys)
        if not keys or len(set(keys)) != len(keys):
            raise ValueError(f"keys must name distinct grouping factors, got {keys}.")
        return cls({key: ClusterVocabulary.from_datalist(datalist, key) for key in keys})

    @classmethod
    def load(cls, path: str | os.PathLike, key: str = "cluster") -> ClusterVocabularies:
        """Read a file saved by :meth:`save`, or a single-factor file of :meth:`ClusterVocabulary.save` (its factor
        is then named ``key``)."""
        content = _read_json(path)
        if not _is_several(content):
            return cls({key: ClusterVocabulary.load(path)})
        factors = content["factors"]
        if not isinstance(factors, dict) or not factors:
            raise ValueError(f"cluster vocabulary {path}: 'factors' must be a non-empty JSON object.")
        vocabularies = {}
        for factor, entry in factors.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("clusters"), list):
                raise ValueError(
                    f"cluster vocabulary {path}: factor {factor!r} must be a JSON object with a 'clusters' list."
                )
            vocabularies[factor] = ClusterVocabulary(entry["clusters"])
        return cls(vocabularies)

    def save(self, path: str | os.PathLike) -> None:
        """Write every factor's vocabulary to one JSON file (atomically, like :meth:`ClusterVocabulary.save`)."""
        factors = {f: {"clusters": v.clusters, "n_clusters": len(v)} for f, v in self._vocabularies.items()}
        with atomic_open(path) as f:
            json.dump({"factors": factors}, f, indent=2)

    @property
    def n_levels(self) -> dict[str, int]:
        """The number of seen levels of every factor."""
        return {f: len(v) for f, v in self._vocabularies.items()}

    def check_n_levels(self, n_levels: Mapping[str, int], source: str = "the model") -> None:
        """Raise a ``ValueError`` if ``source`` has other factors, or another number of levels of a factor, than these
        vocabularies."""
        if list(n_levels) != list(self._vocabularies):
            raise ValueError(
                f"{source} has the grouping factors {list(n_levels)} but the cluster vocabularies have "
                f"{list(self._vocabularies)}: the checkpoint and the vocabularies come from different trainings."
            )
        for factor, n in n_levels.items():
            self._vocabularies[factor].check_n_clusters(n, f"{source} (factor {factor!r})")

    def __getitem__(self, factor: str) -> ClusterVocabulary:
        try:
            return self._vocabularies[factor]
        except KeyError:
            raise KeyError(f"no cluster vocabulary for {factor!r}; factors: {list(self._vocabularies)}.") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._vocabularies)

    def __len__(self) -> int:
        return len(self._vocabularies)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ClusterVocabularies) and list(self.items()) == list(other.items())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.n_levels})"


class ClusterIndexd(MapTransform):
    """Dictionary transform: replaces raw cluster ids with vocabulary indices (``int64``; unknown ids -> ``-1``).

    Several grouping factors (``keys=["site", "subject"]``) each take their own vocabulary from a mapping
    ``key -> vocabulary`` (e.g. :class:`ClusterVocabularies`); a single vocabulary serves every key. Every distinct
    unknown id of a key is logged once (a warning: those samples get a zero random effect for that factor only, or the
    Z-predictor's inferred membership; the warning names a vocabulary id that writes the same number differently, such
    as ``"03"`` for ``"3"``); ``n_unseen`` counts the unseen ids over all keys, ``n_unseen_by_key`` per key (the
    calls in this process: data-loader workers count on their own copies, and a cached dataset counts once). A missing
    key raises a ``KeyError`` naming it, and a missing value (``None``, NaN, empty) a ``ValueError``, unless
    ``missing_as_unseen`` (or ``allow_missing_keys``, which skips the key: then a batch that mixes items with and
    without it cannot be collated).

    Args:
        keys: key(s) of the raw cluster id, one per grouping factor.
        vocabulary: a :class:`ClusterVocabulary` or the path of its JSON file (used for every key), or a mapping
            ``key -> vocabulary`` (:class:`ClusterVocabularies`, or a dict of vocabularies or paths) with an entry for
            every key; a path to a file saved by :meth:`ClusterVocabularies.save` reads as that mapping.
        output_key: where to write the index (default: replace the raw id in place); only with a single key.
        raw_key_suffix: if set, keep the raw id, as the text the vocabulary compares (``3`` becomes ``"3"``), under
            ``key + raw_key_suffix`` (e.g. ``"_id"``); an item without one (``missing_as_unseen``) gets ``""``.
        allow_missing_keys: skip samples without the key instead of raising.
        missing_as_unseen: give an item without a cluster id (no key, or a missing value) the index ``-1``, like an
            unseen cluster, so a batch may mix items with and without one (inference). ``ARMEDEvaluator``'s
            ``observed`` mode then uses the Z-predictor's inferred membership for them, else fixed effects. Logged
            once per key; ``n_missing`` (``n_missing_by_key``) counts them.

    Example::

        t = ClusterIndexd(keys="cluster", vocabulary="models/clusters.json")
        t({"features": x, "cluster": "siteA"})["cluster"]      # tensor(0)
        t = ClusterIndexd(keys="cluster", vocabulary="models/clusters.json", missing_as_unseen=True)
        t({"features": x})["cluster"]                          # tensor(-1)
        vocabs = ClusterVocabularies.from_datalist(train_list, keys=["site", "subject"])
        t = ClusterIndexd(keys=["site", "subject"], vocabulary=vocabs)
        t({"site": "A", "subject": "s17"})                     # {"site": tensor(0), "subject": tensor(8)}
    """

    def __init__(
        self,
        keys: KeysCollection,
        vocabulary: ClusterVocabulary | Mapping[str, ClusterVocabulary | str | os.PathLike] | str | os.PathLike,
        output_key: str | None = None,
        raw_key_suffix: str | None = None,
        allow_missing_keys: bool = False,
        missing_as_unseen: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if output_key is not None and len(self.keys) > 1:
            raise ValueError(f"output_key needs a single key, got keys {list(self.keys)}.")
        if isinstance(vocabulary, (str, os.PathLike)) and _is_several(_read_json(vocabulary)):
            vocabulary = ClusterVocabularies.load(vocabulary)
        if isinstance(vocabulary, Mapping):
            missing = [k for k in self.keys if k not in vocabulary]
            if missing:
                raise ValueError(
                    f"the vocabulary mapping has no entry for the key(s) {missing}; it has {list(vocabulary)}."
                )
            self._vocabularies = {k: _vocabulary(vocabulary[k]) for k in self.keys}
        else:
            single = _vocabulary(vocabulary)
            self._vocabularies = dict.fromkeys(self.keys, single)
        #: the vocabulary as given: one ``ClusterVocabulary`` or the mapping key -> vocabulary
        self.vocabulary = vocabulary if isinstance(vocabulary, Mapping) else single
        self.output_key, self.raw_key_suffix = output_key, raw_key_suffix
        self.missing_as_unseen = missing_as_unseen
        self.n_unseen = self.n_missing = 0
        self.n_unseen_by_key: dict[Hashable, int] = dict.fromkeys(self.keys, 0)
        self.n_missing_by_key: dict[Hashable, int] = dict.fromkeys(self.keys, 0)
        self._reported: set[tuple[Hashable, str]] = set()

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        keys = self.keys if self.missing_as_unseen else self.key_iterator(d)
        for key in keys:
            if self.missing_as_unseen and (key not in d or is_missing_value(d[key])):
                self._report_missing(key)
                index, name = -1, ""
            else:
                raw = d[key]
                name = cluster_id(raw, f"key {key!r}")
                index = self._vocabularies[key].index(name)
                if index < 0:
                    self._report_unseen(key, raw)
            if self.raw_key_suffix:  # text for every item, so that a batch of them collates
                d[f"{key}{self.raw_key_suffix}"] = name
            d[self.output_key or key] = torch.tensor(index, dtype=torch.int64)
        return d

    def _report_unseen(self, key: Hashable, raw: object) -> None:
        self.n_unseen += 1
        self.n_unseen_by_key[key] += 1
        name = cluster_id(raw)
        if (key, name) not in self._reported:
            self._reported.add((key, name))
            vocabulary = self._vocabularies[key]
            twins = vocabulary.lookalikes(name)
            hint = f" The vocabulary has {twins}: ids are compared as text." if twins else ""
            which = f" of {key!r}" if len(self._vocabularies) > 1 else ""
            logger.warning(
                f"cluster {name!r} is not in the vocabulary{which} ({len(vocabulary)} clusters): treated as "
                "unseen (-1)." + hint
            )

    def _report_missing(self, key: Hashable) -> None:
        self.n_missing += 1
        self.n_missing_by_key[key] += 1
        if self.n_missing_by_key[key] == 1:
            logger.warning(
                f"an item has no cluster id under {key!r}: items without one are treated as unseen (-1), so they get "
                "the Z-predictor's inferred membership (ARMEDEvaluator, observed mode) or else fixed effects only; "
                "ClusterIndexd.n_missing counts them."
            )


def _vocabulary(vocabulary: ClusterVocabulary | str | os.PathLike) -> ClusterVocabulary:
    return vocabulary if isinstance(vocabulary, ClusterVocabulary) else ClusterVocabulary.load(vocabulary)


ClusterIndexD = ClusterIndexDict = ClusterIndexd
