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

import logging
import re

import numpy as np
import pandas as pd
import pytest

import monai_armed.data
from monai_armed.data.formula import MixedFormula, RandomTerm, build_design, parse_mixed_formula


def _frame() -> pd.DataFrame:
    """Eight rows: two subjects crossed with two sites, a numeric and a categorical covariate."""
    return pd.DataFrame(
        {
            "y": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0],
            "x1": [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0],
            "x2": ["a", "b", "c", "a", "b", "c", "a", "b"],
            "Days": [0, 1, 2, 3, 0, 1, 2, 3],
            "Subject": ["s1", "s1", "s1", "s1", "s2", "s2", "s2", "s2"],
            "site": ["B", "A", "B", "A", "B", "A", "B", "A"],
        }
    )


@pytest.mark.parametrize(
    "formula, expected",
    [
        ("Reaction ~ Days + (Days | Subject)", MixedFormula("Reaction", "Days", (RandomTerm("Days", "Subject"),))),
        (
            "y ~ x1 + C(x2) + (1 + Days | Subject) + (1 | site)",
            MixedFormula("y", "x1 + C(x2)", (RandomTerm("1 + Days", "Subject"), RandomTerm("1", "site"))),
        ),
        ("y ~ x + (x || g)", MixedFormula("y", "x", (RandomTerm("x", "g", correlated=False),))),
        ("y ~ 0 + x + (0 + x | g)", MixedFormula("y", "0 + x", (RandomTerm("0 + x", "g"),))),
        ("y ~ x - 1 + (x - 1 | g)", MixedFormula("y", "x - 1", (RandomTerm("x - 1", "g"),))),
        ("y ~ -1 + x + (1|g)", MixedFormula("y", "-1 + x", (RandomTerm("1", "g"),))),
        ("y~x+(1|g)-1", MixedFormula("y", "x - 1", (RandomTerm("1", "g"),))),
        ("y ~ (1 | site/subject)", MixedFormula("y", "1", (RandomTerm("1", "site"), RandomTerm("1", "site:subject")))),
        (
            "y ~ x + (x || a/b/c)",
            MixedFormula(
                "y", "x", tuple(RandomTerm("x", g, correlated=False) for g in ("a", "a:b", "a:b:c"))
            ),
        ),
        ("y ~ x + (1 | site:subject)", MixedFormula("y", "x", (RandomTerm("1", "site:subject"),))),
        (
            "y ~ I(x**2) + np.log(z) + C(x2, contr.treatment('b')) + (1 | g)",
            MixedFormula("y", "I(x**2) + np.log(z) + C(x2, contr.treatment('b'))", (RandomTerm("1", "g"),)),
        ),
        ("y ~ (1 | g) + (1 | h)", MixedFormula("y", "1", (RandomTerm("1", "g"), RandomTerm("1", "h")))),
        ("y ~ 0 + (1 | g)", MixedFormula("y", "0", (RandomTerm("1", "g"),))),
        ("y ~ (x1 + x2)^2 + ((1 | g))", MixedFormula("y", "(x1 + x2)^2", (RandomTerm("1", "g"),))),
        ("y ~ x*z + (1|g) + (0+x|g)", MixedFormula("y", "x*z", (RandomTerm("1", "g"), RandomTerm("0+x", "g")))),
        ("`my y` ~ x + (1 | `my site`)", MixedFormula("my y", "x", (RandomTerm("1", "my site"),))),
        ("y ~ x + {x**-2}", MixedFormula("y", "x + {x**-2}", ())),
    ],
)
def test_parse(formula, expected):
    parsed = parse_mixed_formula(formula)
    assert parsed == expected
    assert parse_mixed_formula(str(parsed)) == parsed  # str writes a formula that parses back to the same


@pytest.mark.parametrize(
    "terms, intercept", [("Days", True), ("1 + Days", True), ("1", True), ("0 + Days", False), ("Days - 1", False)]
)
def test_random_intercept(terms, intercept):
    assert RandomTerm(terms, "g").has_intercept is intercept


def test_group_columns_and_text():
    term = parse_mixed_formula("y ~ (Days || site/subject)").random[1]
    assert term.group_columns == ("site", "subject")
    assert str(term) == "(Days || site:subject)"


@pytest.mark.parametrize(
    "formula, message",
    [
        ("y x + (1 | g)", "has no '~'"),
        ("y ~ x ~ z", "more than one '~'"),
        ("~ x + (1 | g)", "no response"),
        ("log(y) ~ x", "must be a column name"),
        ("y ~ x + (1 | )", "empty group"),
        ("y ~ x + ( | g)", "no terms before '|'"),
        ("y ~ x + 1 | g", "bar term without parentheses"),
        ("y ~ x + (1 | g):z", "must be added on its own"),
        ("y ~ x - (1 | g)", "is subtracted"),
        ("y ~ x + (1 | a | b)", "more than one '|'"),
        ("y ~ x + (1 | g + h)", "must be a column name, 'a:b'"),
        ("y ~ x + (1 | g", "unclosed"),
        ("y ~ x + ", "ends with an operator"),
        ("y ~ x + * z + (1 | g)", "is not a valid formula"),
    ],
)
def test_parse_errors_name_the_problem_and_show_the_formula(formula, message):
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        parse_mixed_formula(formula)
    assert repr(formula) in str(err.value)


def test_fixed_and_random_columns():
    data = _frame()
    design = build_design("y ~ x1 + C(x2) + I(x1**2) + (1 + Days | Subject) + (1 | site)", data)
    assert design.response == "y" and design.n_rows == 8
    assert design.y.dtype == np.float64 and design.y.tolist() == data["y"].tolist()
    assert design.fixed_names == ["(Intercept)", "x1", "C(x2)[T.b]", "C(x2)[T.c]", "I(x1 ** 2)"]
    expected_x = np.column_stack(
        [np.ones(8), data["x1"], data["x2"] == "b", data["x2"] == "c", data["x1"] ** 2]
    ).astype(np.float64)
    assert design.X.dtype == np.float64
    np.testing.assert_array_equal(design.X, expected_x)

    assert list(design.factors) == ["Subject", "site"]
    subject = design.factors["Subject"]
    assert subject.names == ["(Intercept)", "Days"] and subject.correlated
    np.testing.assert_array_equal(subject.Z, np.column_stack([np.ones(8), data["Days"]]))
    assert subject.levels == ["s1", "s2"]
    assert subject.codes.dtype == np.int64 and subject.codes.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert subject.counts.tolist() == [4, 4] and subject.constant_columns == []
    site = design.factors["site"]
    assert site.names == ["(Intercept)"] and site.Z.shape == (8, 1)
    assert site.levels == ["A", "B"] and site.codes.tolist() == [1, 0, 1, 0, 1, 0, 1, 0]
    assert design.vocabularies == {"Subject": ["s1", "s2"], "site": ["A", "B"]}


def test_sleepstudy_formula_gives_an_intercept_and_days_block():
    rng = np.random.default_rng(0)
    subjects = np.repeat(["308", "309", "310"], 10)
    days = np.tile(np.arange(10), 3)
    data = pd.DataFrame({"Reaction": 250 + 10 * days + rng.normal(size=30), "Days": days, "Subject": subjects})
    design = build_design("Reaction ~ Days + (Days | Subject)", data)
    assert design.fixed_names == ["(Intercept)", "Days"]
    block = design.factors["Subject"]
    assert block.names == ["(Intercept)", "Days"] and block.correlated
    assert block.levels == ["308", "309", "310"] and block.counts.tolist() == [10, 10, 10]


def test_no_intercept_and_intercept_only():
    data = _frame()
    design = build_design("y ~ 0 + x1 + (0 + Days | Subject)", data)
    assert design.fixed_names == ["x1"] and design.factors["Subject"].names == ["Days"]
    only = build_design("y ~ (1 | Subject)", data)
    assert only.fixed_names == ["(Intercept)"]
    np.testing.assert_array_equal(only.X, np.ones((8, 1)))


def test_text_ids_from_csv(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("y,x,g,n,f\n1,0.1,01,1,3.0\n2,0.2,1,1,3.0\n3,0.3,001,2,4.0\n4,0.4,01,2,4.0\n5,0.5,1,10,3.0\n")
    data = pd.read_csv(path, dtype={"g": str})
    assert data["n"].dtype.kind == "i" and data["f"].dtype.kind == "f"
    design = build_design("y ~ x + (1 | g) + (1 | n) + (1 | f)", data, source=str(path))
    g = design.factors["g"]
    assert g.levels == ["001", "01", "1"]  # "01", "001" and "1" stay three levels
    assert g.codes.tolist() == [1, 2, 0, 1, 2] and g.counts.tolist() == [1, 2, 2]
    n = design.factors["n"]
    assert n.levels == ["1", "2", "10"] and n.codes.tolist() == [0, 0, 1, 1, 2]  # int 1 -> "1", numeric order
    assert design.factors["f"].levels == ["3", "4"]  # whole floats 3.0 -> "3"


def test_nested_and_interaction_levels_are_pairs():
    data = pd.DataFrame(
        {"y": np.arange(6.0), "site": ["A", "A", "A", "B", "B", "B"], "subject": [1, 2, 1, 1, 2, 2]}
    )
    design = build_design("y ~ (1 | site/subject)", data)
    assert list(design.factors) == ["site", "site:subject"]
    nested = design.factors["site:subject"]
    assert nested.levels == ["A:1", "A:2", "B:1", "B:2"]
    assert nested.codes.tolist() == [0, 1, 0, 2, 3, 3] and nested.counts.tolist() == [2, 1, 1, 2]
    assert build_design("y ~ (1 | site:subject)", data).factors["site:subject"].levels == nested.levels


def test_uncorrelated_and_repeated_group():
    data = _frame()
    design = build_design("y ~ x1 + (Days || Subject) + (1 | site) + (0 + x1 | site)", data)
    assert list(design.factors) == ["Subject", "site", "site.1"]
    assert not design.factors["Subject"].correlated and design.factors["Subject"].names == ["(Intercept)", "Days"]
    assert design.factors["site.1"].names == ["x1"] and design.factors["site.1"].term == RandomTerm("0 + x1", "site")
    np.testing.assert_array_equal(design.factors["site.1"].Z[:, 0], data["x1"])


def test_like_reuses_columns_and_levels_on_new_data():
    train = build_design("y ~ x1 + C(x2) + (1 + C(x2) | Subject) + (1 | site)", _frame())
    new = pd.DataFrame(
        {"y": [0.0, 1.0, 2.0], "x1": [9.0, 8.0, 7.0], "x2": ["a", "a", "b"], "Subject": ["s2", "s9", "s1"],
         "site": ["A", "A", "C"]}
    )  # fmt: skip
    test = build_design(None, new, like=train, source="test.csv")
    assert test.fixed_names == train.fixed_names  # "c" is absent from the new data, its column is not
    np.testing.assert_array_equal(test.X, [[1, 9, 0, 0], [1, 8, 0, 0], [1, 7, 1, 0]])
    subject = test.factors["Subject"]
    assert subject.names == train.factors["Subject"].names == ["(Intercept)", "C(x2)[T.b]", "C(x2)[T.c]"]
    np.testing.assert_array_equal(subject.Z, [[1, 0, 0], [1, 0, 0], [1, 1, 0]])
    assert subject.levels == ["s1", "s2"] and subject.codes.tolist() == [1, -1, 0]  # s9 is unseen
    assert subject.counts.tolist() == [1, 1]  # rows of this data; the unseen row is not counted
    assert test.factors["site"].codes.tolist() == [0, 0, -1]
    assert test.factors["site"].levels == ["A", "B"]  # one level in new data is fine with like=
    assert build_design(train.formula, new, like=train).fixed_names == train.fixed_names


def test_like_errors():
    train = build_design("y ~ C(x2) + (1 | site)", _frame())
    unseen = _frame().assign(x2=["a", "b", "z", "a", "b", "c", "a", "b"])
    with pytest.raises(ValueError, match=r"the fixed-effects columns 'C\(x2\)': test.csv has a category .*'z'"):
        build_design(None, unseen, like=train, source="test.csv")
    with pytest.raises(ValueError, match="differs from the formula 'y ~ C"):
        build_design("y ~ x1 + (1 | site)", _frame(), like=train)
    with pytest.raises(ValueError, match="needs a formula, or like="):
        build_design(None, _frame())


def test_vocabularies():
    data = _frame()
    design = build_design("y ~ (1 | site)", data, vocabularies={"site": ["B", "C"]})
    assert design.factors["site"].levels == ["B", "C"]
    assert design.factors["site"].codes.tolist() == [0, -1] * 4 and design.factors["site"].counts.tolist() == [4, 0]
    with pytest.raises(ValueError, match=r"no entry for factor\(s\) \['Subject'\]"):
        build_design("y ~ (1 | site) + (1 | Subject)", data, vocabularies={"site": ["A", "B"]})
    with pytest.raises(ValueError, match=r"entries \['sight'\] that are not factors"):
        build_design("y ~ (1 | site)", data, vocabularies={"sight": ["A", "B"]})


def test_missing_column_names_term_column_and_source():
    with pytest.raises(ValueError) as err:
        build_design("Reaction ~ Days + (1 + Dayz | Subject)", _frame().rename(columns={"y": "Reaction"}), source="data.csv")
    assert str(err.value).startswith("column 'Dayz' of term '(1 + Dayz | Subject)' is not in data.csv; columns: [")
    assert "'Days'" in str(err.value)
    with pytest.raises(ValueError, match=r"column 'x3' of term 'C\(x3\)' is not in data.csv"):
        build_design("y ~ C(x3) + (1 | site)", _frame(), source="data.csv")
    with pytest.raises(ValueError, match="column 'grp' of term '\\(1 \\| site:grp\\)' is not in data.csv"):
        build_design("y ~ (1 | site:grp)", _frame(), source="data.csv")


def test_missing_response():
    data = _frame().drop(columns="y")
    with pytest.raises(ValueError, match="column 'y' of the response of formula 'y ~ x1 \\+ \\(1 \\| site\\)' is not in a.csv"):
        build_design("y ~ x1 + (1 | site)", data, source="a.csv")
    design = build_design("y ~ x1 + (1 | site)", data, require_response=False)
    assert design.y is None and design.X.shape == (8, 2)


def test_a_response_with_missing_values_is_not_read_for_prediction():
    """Rows to predict may carry their unknown outcomes as NaN (found by helper 52: refused as missing values)."""
    data = _frame().assign(y=np.nan)
    design = build_design("y ~ x1 + (1 | site)", data, require_response=False)
    assert design.y is None and design.X.shape == (8, 2)
    with pytest.raises(ValueError, match="column 'y' of the response .* has 8 missing value"):
        build_design("y ~ x1 + (1 | site)", data)


def test_a_power_inside_a_call_is_a_power_as_in_r():
    """formulaic evaluates I(Days^2) as Python, where ^ is XOR: on an integer column it gave Days XOR 2 (found by
    helper 52). ^ between terms stays the formula's interaction operator."""
    design = build_design("y ~ Days + I(Days^2) + np.log(x1^2) + (1 + I(Days^2) | site)", _frame())
    days = _frame()["Days"].to_numpy(float)
    assert design.X[:, 2].tolist() == (days**2).tolist()
    assert design.X[:, 3] == pytest.approx(np.log(_frame()["x1"].to_numpy() ** 2))
    assert design.factors["site"].Z[:, 1].tolist() == (days**2).tolist()
    interactions = build_design("y ~ (x1 + Days)^2 + (1 | site)", _frame())
    assert interactions.fixed_names == ["(Intercept)", "x1", "Days", "x1:Days"]
    # parentheses inside a call are Python too (found by helper 55: I((Days^2)) was still XOR)
    nested = build_design("y ~ I((Days^2)) + I(1 / (1 + Days^2)) + (1 | site)", _frame())
    assert nested.X[:, 1].tolist() == (days**2).tolist() and nested.X[:, 2] == pytest.approx(1 / (1 + days**2))
    with pytest.raises(ValueError, match=r"negative integer powers.*write x\*\*-1.0 or 1/x"):
        build_design("y ~ I(Days^-1) + (1 | site)", _frame())


def test_dotted_column_names_as_in_data_from_r():
    """formulaic reports day.c as the variable 'day', so dotted names were refused as missing (found by helper 52)."""
    data = _frame().rename(columns={"x1": "day.c", "site": "site.id"})
    for formula in ("y ~ day.c + (1 | site.id)", "y ~ `day.c` + (1 | site.id)", "y ~ np.log(day.c) + (1 | site.id)"):
        design = build_design(formula, data)
        assert design.X[:, 1] == pytest.approx(np.log(data["day.c"]) if "log" in formula else data["day.c"]), formula
    assert build_design("y ~ C(site.id) + (1 | Subject)", data).fixed_names == ["(Intercept)", "C(`site.id`)[T.B]"]
    with pytest.raises(ValueError, match=r"column 'day' of term 'day.d' is not in data"):
        build_design("y ~ day.d + (1 | site.id)", data)
    # a column named like the first part of a dotted one is checked only when the formula uses it (helper 56)
    both = data.assign(day=np.nan)
    assert build_design("y ~ np.log(day.c + 10) + (1 | site.id)", both).X.shape == (8, 2)
    with pytest.raises(ValueError, match=r"column 'day' of term 'day' has 8 missing"):
        build_design("y ~ day + day.c + (1 | site.id)", both)
    centred = build_design("y ~ I(day.c - day.c.mean()) + (1 | site.id)", data).X[:, 1]  # a method of a dotted column
    assert centred == pytest.approx(data["day.c"] - data["day.c"].mean())
    with pytest.raises(ValueError, match=r"not valid Python inside a call .* in backticks, e.g. np.log\(`day.1`\)"):
        parse_mixed_formula("y ~ np.log(day.1) + (1 | g)")
    # a method of a column and a dotted text inside quotes are not columns (helper 55: refused, by the hash seed)
    plain = _frame()
    assert build_design("y ~ I(x1 - x1.mean()) + (1 | site)", plain).X[:, 1] == pytest.approx(plain["x1"] - plain["x1"].mean())
    assert build_design("y ~ C(site, levels=['B.x', 'B', 'A']) + (1 | Subject)", plain).X.shape == (8, 3)


def test_offset_and_an_uncorrelated_categorical_term_are_named(caplog):
    with pytest.raises(ValueError, match=r"offset\(\.\.\.\) term, which is not supported"):
        parse_mixed_formula("y ~ x1 + offset(np.log(t)) + (1 | site)")
    assert parse_mixed_formula("y ~ `offset (mm)` + (1 | site)").fixed == "`offset (mm)`"  # a name, not the call
    with caplog.at_level(logging.WARNING):
        build_design("y ~ x1 + (x2 || Subject)", _frame())
        build_design("y ~ x1 + (`x1[mm]` || Subject)", _frame().assign(**{"x1[mm]": _frame()["x1"]}))
    assert "(1 | Subject) + (0 + f | Subject)" in caplog.text and "['x2']" in caplog.text
    assert "x1[mm]" not in caplog.text, "a numeric column named with brackets is not categorical"


def test_response_read_as_text():
    data = _frame().astype({"y": str})
    assert build_design("y ~ (1 | site)", data).y.tolist() == _frame()["y"].tolist()
    data.loc[5, "y"] = "high"
    with pytest.raises(ValueError, match="response column 'y' in d.csv is not numeric: 'high' in row 5"):
        build_design("y ~ (1 | site)", data, source="d.csv")


def test_continuous_group_is_an_error():
    data = _frame().assign(dose=[0.0, 0.0, 1.0, 1.0, 2.5, 2.5, 3.0, 3.0])
    with pytest.raises(ValueError) as err:
        build_design("y ~ x1 + (1 | dose)", data, source="data.csv")
    message = str(err.value)
    assert "grouping column 'dose' of term '(1 | dose)' in data.csv, row 4: 2.5 is not a whole number" in message
    assert "astype(str)" in message


def test_one_level_factor_is_an_error():
    data = _frame().assign(site="A")
    with pytest.raises(ValueError) as err:
        build_design("y ~ x1 + (1 | Subject) + (1 | site)", data, source="data.csv")
    assert str(err.value).startswith("a random effect needs >= 2 levels; factor 'site' has 1 ('A') in data.csv")


@pytest.mark.parametrize(
    "column, value, problem",
    [("y", np.nan, "missing value(s) (NaN)"), ("x1", np.nan, "missing value(s) (NaN)"),
     ("x1", np.inf, "infinite value(s)"), ("Days", np.nan, "missing value(s) (NaN)"),
     ("site", None, "missing value(s) (NaN)")],
)  # fmt: skip
def test_missing_values_name_column_and_first_row(column, value, problem):
    data = _frame()
    data[column] = data[column].astype(object if value is None else float)
    data.loc[[3, 6], column] = value
    data.index = data.index + 100
    with pytest.raises(ValueError) as err:
        build_design("y ~ x1 + (1 + Days | Subject) + (1 | site)", data, source="data.csv")
    assert f"column {column!r} of " in str(err.value)
    assert f"has 2 {problem} in data.csv, the first in row 3 (index 103)" in str(err.value)


def test_missing_value_in_unused_column_is_fine():
    data = _frame().assign(unused=np.nan)
    assert build_design("y ~ x1 + (1 | site)", data).n_rows == 8


def test_constant_columns():
    data = _frame().assign(dose=2.0)
    design = build_design("y ~ x1 + (1 + dose + Days | Subject) + (0 + dose | site)", data)
    assert design.factors["Subject"].constant_columns == ["dose"]
    assert design.factors["site"].constant_columns == ["dose"]
    assert build_design("y ~ (1 | site)", data).factors["site"].constant_columns == []  # the intercept is not reported


def test_exported():
    for name in ("RandomTerm", "MixedFormula", "FactorDesign", "MixedDesign", "parse_mixed_formula", "build_design"):
        assert getattr(monai_armed.data, name) is getattr(monai_armed.data.formula, name)
        assert name in monai_armed.data.formula.__all__
