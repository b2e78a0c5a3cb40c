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
import tempfile
import unittest
from pathlib import Path

import numpy as np
import pytest
import torch
from parameterized import parameterized

from monai_armed.transforms import ClusterIndexd, ClusterVocabularies, ClusterVocabulary
from monai_armed.transforms.cluster_index import ClusterIndexD, ClusterIndexDict

LOGGER = "monai_armed.transforms.cluster_index"


class TestClusterVocabulary(unittest.TestCase):
    def test_ints_sort_numerically(self):
        vocab = ClusterVocabulary.from_ids([10, 2, 33, 2, 1, -4])
        self.assertEqual(vocab.clusters, ["-4", "1", "2", "10", "33"])
        self.assertEqual(len(vocab), 5)
        self.assertEqual(vocab.index(10), 3)

    def test_numeric_strings_sort_numerically(self):
        self.assertEqual(ClusterVocabulary.from_ids(["10", "9", "100"]).clusters, ["9", "10", "100"])

    def test_strings_sort_lexically(self):
        vocab = ClusterVocabulary.from_ids(["siteB", "siteA", "site10", "siteB", "site9"])
        self.assertEqual(vocab.clusters, ["site10", "site9", "siteA", "siteB"])
        self.assertEqual(vocab.index("siteB"), 3)

    def test_mixed_ids_sort_lexically(self):
        self.assertEqual(ClusterVocabulary.from_ids([10, "a", 9]).clusters, ["10", "9", "a"])

    @parameterized.expand(
        [
            ("int", 3),
            ("str", "3"),
            ("padded_str", " 3 "),
            ("np_int64", np.int64(3)),
            ("tensor", torch.tensor(3)),
        ]
    )
    def test_equivalent_ids(self, _, raw):
        vocab = ClusterVocabulary.from_ids([1, 3, 7])
        self.assertEqual(vocab.index(raw), 1)
        self.assertIn(raw, vocab)

    @parameterized.expand([("float", 3.0), ("np_float", np.float32(3.0)), ("float_tensor", torch.tensor(3.0))])
    def test_float_ids_are_their_own_text(self, _, raw):
        # a float id is "3.0", as a CSV cell written by pandas from a float column: not the cluster "3"
        vocab = ClusterVocabulary.from_ids([1, 3, 7])
        self.assertEqual(vocab.index(raw), -1)
        self.assertNotIn(raw, vocab)
        self.assertEqual(ClusterVocabulary.from_ids([raw, "3.0"]).clusters, ["3.0"])
        self.assertEqual(vocab.lookalikes(raw), ["3"])

    def test_zero_padded_ids_are_distinct_and_sort_as_text(self):
        vocab = ClusterVocabulary.from_ids(["1", "01", "001", "01"])
        self.assertEqual(vocab.clusters, ["001", "01", "1"])
        self.assertEqual([vocab.index(i) for i in ("001", "01", "1", 1)], [0, 1, 2, 2])
        # integers of distinct values still sort numerically, zero-padded or not
        self.assertEqual(ClusterVocabulary.from_ids(["10", "02", "1"]).clusters, ["1", "02", "10"])

    @parameterized.expand([("none", None), ("nan", float("nan")), ("empty", " "), ("na", "NA"), ("np_nan", np.nan)])
    def test_missing_ids_are_errors(self, _, raw):
        with self.assertRaisesRegex(ValueError, "missing cluster id"):
            ClusterVocabulary.from_ids(["a", raw])
        with self.assertRaisesRegex(ValueError, r"datalist item 1, key 'cluster': missing cluster id"):
            ClusterVocabulary.from_datalist([{"cluster": "a"}, {"cluster": raw}])
        vocab = ClusterVocabulary(["a"])
        self.assertNotIn(raw, vocab)
        with self.assertRaisesRegex(ValueError, "missing cluster id"):
            vocab.index(raw)

    def test_equivalent_ids_collapse_when_building(self):
        vocab = ClusterVocabulary.from_ids([3, "3", np.int64(3), torch.tensor(3), 4])
        self.assertEqual(vocab.clusters, ["3", "4"])

    def test_ids_that_are_neither_text_nor_numbers(self):
        with self.assertRaisesRegex(ValueError, r"cluster id True \(bool\); expected a string or a number"):
            ClusterVocabulary.from_ids(["a", True])
        with self.assertRaisesRegex(ValueError, r"cluster vocabulary entry 1: cluster id \['b'\] \(list\)"):
            ClusterVocabulary(["a", ["b"]])

    def test_unknown(self):
        vocab = ClusterVocabulary(["a", "b"])
        self.assertEqual(vocab.index("c"), -1)
        self.assertEqual(vocab.index(0), -1)
        self.assertNotIn("c", vocab)

    def test_constructor_keeps_order(self):
        vocab = ClusterVocabulary(["z", "a"])
        self.assertEqual(vocab.index("z"), 0)
        self.assertEqual(vocab.index("a"), 1)

    def test_duplicates(self):
        with self.assertRaisesRegex(ValueError, r"duplicate.*'3'"):
            ClusterVocabulary([3, "3", 4])
        with self.assertRaisesRegex(ValueError, "duplicate"):
            ClusterVocabulary(["a", "b", "a"])

    def test_empty(self):
        with self.assertRaisesRegex(ValueError, "at least one"):
            ClusterVocabulary([])
        with self.assertRaisesRegex(ValueError, "at least one"):
            ClusterVocabulary.from_ids([])

    def test_equality(self):
        self.assertEqual(ClusterVocabulary([1, 2]), ClusterVocabulary(["1", "2"]))
        self.assertNotEqual(ClusterVocabulary([1, 2]), ClusterVocabulary([2, 1]))
        self.assertNotEqual(ClusterVocabulary([1, 2]), ["1", "2"])

    def test_from_datalist(self):
        datalist = [{"cluster": "b"}, {"cluster": "a"}, {"cluster": "b", "x": 1}]
        self.assertEqual(ClusterVocabulary.from_datalist(datalist).clusters, ["a", "b"])
        site_list = [{"site": 2}, {"site": 1}]
        self.assertEqual(ClusterVocabulary.from_datalist(site_list, key="site").clusters, ["1", "2"])

    def test_from_datalist_missing_key(self):
        datalist = [{"cluster": "a"}, {"cluster": "b"}, {"site": "c", "label": 1}]
        with self.assertRaises(KeyError) as ctx:
            ClusterVocabulary.from_datalist(datalist)
        msg = str(ctx.exception)
        self.assertIn("item 2", msg)
        self.assertIn("'cluster'", msg)
        self.assertIn("site", msg)

    def test_check_n_clusters(self):
        vocab = ClusterVocabulary.from_ids(range(10))
        vocab.check_n_clusters(10)
        with self.assertRaises(ValueError) as ctx:
            vocab.check_n_clusters(12)
        self.assertIn("12", str(ctx.exception))
        self.assertIn("10", str(ctx.exception))
        with self.assertRaisesRegex(ValueError, "checkpoint.pt has 9"):
            vocab.check_n_clusters(9, source="checkpoint.pt")


def test_save_load_round_trip(tmp_path):
    vocab = ClusterVocabulary.from_ids(["siteB", "siteA", "siteC"])
    path = tmp_path / "nested" / "clusters.json"
    vocab.save(path)
    content = json.loads(path.read_text())
    assert content["clusters"] == ["siteA", "siteB", "siteC"]
    assert content["n_clusters"] == 3
    loaded = ClusterVocabulary.load(path)
    assert loaded == vocab
    assert loaded.index("siteC") == 2
    assert ClusterVocabulary.load(str(path)) == vocab
    assert [p.name for p in path.parent.iterdir()] == ["clusters.json"]  # no temporary file left behind
    # overwrite in place
    ClusterVocabulary([1, 2]).save(path)
    assert ClusterVocabulary.load(path).clusters == ["1", "2"]


def test_saved_vocabularies_keep_loading_as_text(tmp_path):
    path = tmp_path / "clusters.json"
    path.write_text(json.dumps({"clusters": [3, 1, "01"], "n_clusters": 3}))  # ints, as an older file may hold
    vocab = ClusterVocabulary.load(path)
    assert vocab.clusters == ["3", "1", "01"]  # the saved order is the index order
    assert [vocab.index(i) for i in ("3", 1, "1", "01", "001")] == [0, 1, 1, 2, -1]


def test_load_missing_file(tmp_path):
    path = tmp_path / "absent.json"
    with pytest.raises(FileNotFoundError, match="absent.json"):
        ClusterVocabulary.load(path)


def test_load_corrupt_json(tmp_path):
    path = tmp_path / "corrupt.json"
    path.write_text('{"clusters": ["a", ')
    with pytest.raises(ValueError, match="corrupt.json"):
        ClusterVocabulary.load(path)


@pytest.mark.parametrize("content", ['["a", "b"]', '{"names": ["a"]}', '{"clusters": "a"}'])
def test_load_wrong_structure(tmp_path, content):
    path = tmp_path / "wrong.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=r"wrong\.json.*'clusters'"):
        ClusterVocabulary.load(path)


def test_load_duplicates(tmp_path):
    path = tmp_path / "dup.json"
    path.write_text(json.dumps({"clusters": ["a", "a"]}))
    with pytest.raises(ValueError, match="duplicate"):
        ClusterVocabulary.load(path)


class TestClusterIndexd(unittest.TestCase):
    def setUp(self):
        self.vocab = ClusterVocabulary.from_ids(["siteA", "siteB", "siteC"])

    def test_maps_to_int64_tensor(self):
        t = ClusterIndexd("cluster", self.vocab)
        out = t({"features": [1.0], "cluster": "siteB"})
        self.assertIsInstance(out["cluster"], torch.Tensor)
        self.assertEqual(out["cluster"].dtype, torch.int64)
        self.assertEqual(int(out["cluster"]), 1)
        self.assertEqual(out["features"], [1.0])

    def test_input_not_modified(self):
        data = {"cluster": "siteC"}
        ClusterIndexd("cluster", self.vocab)(data)
        self.assertEqual(data, {"cluster": "siteC"})

    def test_missing_key(self):
        t = ClusterIndexd("cluster", self.vocab)
        with self.assertRaisesRegex(KeyError, "cluster"):
            t({"features": [1.0]})
        skip = ClusterIndexd("cluster", self.vocab, allow_missing_keys=True)
        self.assertEqual(skip({"features": [1.0]}), {"features": [1.0]})

    def test_missing_value_without_option_names_the_key(self):
        with self.assertRaisesRegex(ValueError, r"key 'cluster': missing cluster id"):
            ClusterIndexd("cluster", self.vocab)({"cluster": None})

    def test_missing_as_unseen(self):
        t = ClusterIndexd("cluster", self.vocab, raw_key_suffix="_id", missing_as_unseen=True)
        outs = [t(d) for d in ({"x": 1}, {"x": 2, "cluster": "siteB"}, {"x": 3, "cluster": float("nan")}, {"x": 4})]
        self.assertEqual([int(o["cluster"]) for o in outs], [-1, 1, -1, -1])
        self.assertTrue(all(o["cluster"].dtype == torch.int64 for o in outs))
        self.assertEqual([o.get("cluster_id") for o in outs], ["", "siteB", "", ""])
        # items with and without a cluster collate into one batch, the raw ids as text
        from monai.data import DataLoader, Dataset

        index = ClusterIndexd("cluster", ClusterVocabulary(["A", "B"]), missing_as_unseen=True, raw_key_suffix="_id")
        for order in (["A", None], [None, "A"]):
            items = [{"cluster": c} if c else {} for c in order]
            batch = next(iter(DataLoader(Dataset(items, index), batch_size=2)))
            self.assertEqual(batch["cluster"].tolist(), [0 if c else -1 for c in order])
            self.assertEqual(batch["cluster_id"], [c or "" for c in order])
        self.assertEqual((t.n_missing, t.n_unseen), (3, 0))
        site = ClusterIndexd("site", self.vocab, output_key="cluster", missing_as_unseen=True)
        self.assertEqual(int(site({"x": 1})["cluster"]), -1)

    def test_raw_key_suffix(self):
        t = ClusterIndexd("cluster", self.vocab, raw_key_suffix="_id")
        out = t({"cluster": "siteC"})
        self.assertEqual(out["cluster_id"], "siteC")
        self.assertEqual(int(out["cluster"]), 2)
        numbers = ClusterIndexd("cluster", ClusterVocabulary([3, 7]), raw_key_suffix="_id")
        self.assertEqual(numbers({"cluster": 7})["cluster_id"], "7")

    def test_pandas_missing_markers_are_missing(self):
        import pandas as pd

        t = ClusterIndexd("cluster", self.vocab, missing_as_unseen=True)
        self.assertEqual(int(t({"cluster": pd.NA})["cluster"]), -1)
        self.assertEqual(int(t({"cluster": pd.Series(["siteA", None], dtype="string").tolist()[1]})["cluster"]), -1)

    def test_output_key(self):
        t = ClusterIndexd("site", self.vocab, output_key="cluster")
        out = t({"site": "siteA"})
        self.assertEqual(out["site"], "siteA")
        self.assertEqual(int(out["cluster"]), 0)

    def test_vocabulary_from_path(self):
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "v.json"
            self.vocab.save(path)
            t = ClusterIndexd("cluster", str(path))
        self.assertEqual(t.vocabulary, self.vocab)
        self.assertEqual(int(t({"cluster": "siteB"})["cluster"]), 1)

    def test_aliases(self):
        self.assertIs(ClusterIndexD, ClusterIndexd)
        self.assertIs(ClusterIndexDict, ClusterIndexd)


def test_unseen_logged_once_per_id(caplog):
    vocab = ClusterVocabulary.from_ids(["siteA", "siteB"])
    t = ClusterIndexd("cluster", vocab)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        outs = [t({"cluster": c}) for c in ["siteZ", "siteA", "siteZ", "siteY", "siteZ", "siteY"]]
    assert [int(o["cluster"]) for o in outs] == [-1, 0, -1, -1, -1, -1]
    assert t.n_unseen == 5
    records = [r for r in caplog.records if r.name == LOGGER]
    assert len(records) == 2
    assert all(r.levelno == logging.WARNING for r in records)
    assert "'siteZ'" in records[0].getMessage()
    assert "'siteY'" in records[1].getMessage()
    assert "-1" in records[0].getMessage()


def test_seen_ids_do_not_log(caplog):
    t = ClusterIndexd("cluster", ClusterVocabulary.from_ids([1, 2]))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert int(t({"cluster": np.int64(2)})["cluster"]) == 1
        assert int(t({"cluster": torch.tensor(1)})["cluster"]) == 0
    assert t.n_unseen == 0
    assert not [r for r in caplog.records if r.name == LOGGER]


def test_output_key_needs_a_single_key():
    with pytest.raises(ValueError, match="output_key needs a single key"):
        ClusterIndexd(keys=["site", "scanner"], vocabulary=ClusterVocabulary(["a"]), output_key="cluster")


def test_missing_as_unseen_logs_once(caplog):
    t = ClusterIndexd("cluster", ClusterVocabulary(["a"]), missing_as_unseen=True)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(3):
            t({"features": [0.0]})
    records = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(records) == 1 and "no cluster id under 'cluster'" in records[0] and "Z-predictor" in records[0]
    assert t.n_missing == 3


def test_unseen_warning_names_an_id_written_differently(caplog):
    t = ClusterIndexd("cluster", ClusterVocabulary(["03", "4"]))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert int(t({"cluster": 3})["cluster"]) == -1
        assert int(t({"cluster": "x"})["cluster"]) == -1
    first, second = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert "cluster '3' is not in the vocabulary" in first and "['03']" in first and "compared as text" in first
    assert "compared as text" not in second


def _two_factor_vocabularies() -> ClusterVocabularies:
    datalist = [{"site": s, "subject": f"s{k}"} for k, s in enumerate(["A", "B", "A", "C"])]
    return ClusterVocabularies.from_datalist(datalist, keys=["site", "subject"])


def test_vocabularies_from_datalist_keep_factor_order():
    vocabs = _two_factor_vocabularies()
    assert list(vocabs) == ["site", "subject"]
    assert vocabs.n_levels == {"site": 3, "subject": 4}
    assert vocabs["site"].clusters == ["A", "B", "C"]
    with pytest.raises(KeyError, match="no cluster vocabulary for 'scanner'"):
        vocabs["scanner"]
    with pytest.raises(KeyError, match="item 1 has no cluster key 'subject'"):
        ClusterVocabularies.from_datalist([{"site": 1, "subject": 1}, {"site": 2}], keys=["site", "subject"])
    with pytest.raises(ValueError, match="distinct"):
        ClusterVocabularies.from_datalist([{"site": 1}], keys=["site", "site"])


def test_vocabularies_save_load_round_trip(tmp_path):
    vocabs = _two_factor_vocabularies()
    path = tmp_path / "models" / "clusters.json"
    vocabs.save(path)
    content = json.loads(path.read_text())
    assert list(content["factors"]) == ["site", "subject"]
    assert content["factors"]["site"] == {"clusters": ["A", "B", "C"], "n_clusters": 3}
    loaded = ClusterVocabularies.load(path)
    assert loaded == vocabs and list(loaded) == ["site", "subject"]
    assert loaded != ClusterVocabularies({"subject": vocabs["subject"], "site": vocabs["site"]})  # order matters
    assert [p.name for p in path.parent.iterdir()] == ["clusters.json"]
    # a single-factor file still reads both ways; a several-factor file is refused by the single reader
    ClusterVocabulary(["x", "y"]).save(tmp_path / "one.json")
    assert ClusterVocabularies.load(tmp_path / "one.json", key="site") == ClusterVocabularies({"site": ["x", "y"]})
    with pytest.raises(ValueError, match=r"several grouping factors \['site', 'subject'\].*ClusterVocabularies.load"):
        ClusterVocabulary.load(path)
    path.write_text(json.dumps({"factors": {"site": ["A"]}}))
    with pytest.raises(ValueError, match="factor 'site' must be a JSON object with a 'clusters' list"):
        ClusterVocabularies.load(path)


def test_vocabularies_check_n_levels():
    vocabs = _two_factor_vocabularies()
    vocabs.check_n_levels({"site": 3, "subject": 4})
    with pytest.raises(ValueError, match=r"factor 'subject'\) has 5 clusters"):
        vocabs.check_n_levels({"site": 3, "subject": 5})
    with pytest.raises(ValueError, match="grouping factors"):
        vocabs.check_n_levels({"subject": 4, "site": 3})


def test_two_keys_each_with_its_own_vocabulary(caplog, tmp_path):
    vocabs = _two_factor_vocabularies()
    t = ClusterIndexd(keys=["site", "subject"], vocabulary=vocabs, raw_key_suffix="_id")
    items = [{"site": "B", "subject": "s3"}, {"site": "C", "subject": "s9"}, {"site": "A", "subject": "s9"}]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        outs = [t(item) for item in items]
    assert [(int(o["site"]), int(o["subject"])) for o in outs] == [(1, 3), (2, -1), (0, -1)]
    assert all(o["site"].dtype == o["subject"].dtype == torch.int64 for o in outs)
    assert outs[1]["subject_id"] == "s9" and outs[1]["site_id"] == "C"
    assert t.n_unseen_by_key == {"site": 0, "subject": 2}
    assert t.n_unseen == 2
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(messages) == 1 and "'s9' is not in the vocabulary of 'subject' (4 clusters)" in messages[0]
    # a site id that happens to be a subject id is unseen for the site only
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = t({"site": "s0", "subject": "s0"})
    assert (int(out["site"]), int(out["subject"])) == (-1, 0)
    assert t.n_unseen_by_key == {"site": 1, "subject": 2}
    assert "of 'site'" in caplog.records[-1].getMessage()
    # the same mapping read from its file, and a plain dict of a vocabulary and a path
    vocabs.save(tmp_path / "clusters.json")
    vocabs["subject"].save(tmp_path / "subject.json")
    for vocabulary in (str(tmp_path / "clusters.json"), {"site": vocabs["site"], "subject": tmp_path / "subject.json"}):
        again = ClusterIndexd(keys=["site", "subject"], vocabulary=vocabulary)
        assert {k: int(v) for k, v in again(items[0]).items()} == {"site": 1, "subject": 3}


def test_two_keys_missing_as_unseen_counts_per_key(caplog):
    t = ClusterIndexd(keys=["site", "subject"], vocabulary=_two_factor_vocabularies(), missing_as_unseen=True)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        outs = [t({"site": "A"}), t({"site": "A"}), t({"subject": "s1"})]
    assert [(int(o["site"]), int(o["subject"])) for o in outs] == [(0, -1), (0, -1), (-1, 1)]
    assert t.n_missing_by_key == {"site": 1, "subject": 2} and t.n_missing == 3
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(messages) == 2 and "under 'subject'" in messages[0] and "under 'site'" in messages[1]


def test_vocabulary_mapping_needs_every_key():
    with pytest.raises(ValueError, match=r"no entry for the key\(s\) \['scanner'\]"):
        ClusterIndexd(keys=["site", "scanner"], vocabulary=_two_factor_vocabularies())


def test_one_vocabulary_for_several_keys_keeps_todays_behaviour():
    vocab = ClusterVocabulary(["a", "b"])
    t = ClusterIndexd(keys=["left", "right"], vocabulary=vocab)
    out = t({"left": "b", "right": "z"})
    assert (int(out["left"]), int(out["right"])) == (1, -1)
    assert t.vocabulary is vocab and t.n_unseen == 1 and t.n_unseen_by_key == {"left": 0, "right": 1}
