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
lme4-style mixed-model formulas: ``y ~ x1 + C(x2) + (1 + Days | Subject) + (1 | site)``.

:func:`parse_mixed_formula` splits a formula into its response, its fixed part (handed to formulaic) and its random
terms ``(terms | group)``; :func:`build_design` turns it and a ``pandas.DataFrame`` into numpy design matrices: the
response ``y``, the fixed-effects design ``X`` and, per grouping factor, the random-effects design ``Z`` with the level
index of every row. Grouping-factor levels are text ids, as everywhere in monai_armed
(:func:`monai_armed.utils.cluster_id`).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from formulaic import Formula, ModelSpec
from formulaic.errors import DataMismatchWarning, FormulaicError

from monai_armed.transforms.cluster_index import ClusterVocabulary
from monai_armed.utils import cluster_id

__all__ = ["RandomTerm", "MixedFormula", "FactorDesign", "MixedDesign", "parse_mixed_formula", "build_design"]

logger = logging.getLogger(__name__)

INTERCEPT = "(Intercept)"
_CLOSERS = {"(": ")", "[": "]", "{": "}"}
_QUOTES = "'\"`"
_NAME = re.compile(r"[A-Za-z_.][A-Za-z0-9_.]*|`[^`]+`")
_ANSI = re.compile(r"\x1b\[[0-9;]*m|[\u29da\u29db]")


def _quoted(column: str) -> str:
    """A column name as a formula writes it: in backticks unless it is a plain name."""
    return column if _NAME.fullmatch(column) else f"`{column}`"


@dataclass(frozen=True)
class RandomTerm:
    """One random-effects term ``(terms | group)`` of a mixed formula.

    Args:
        terms: the formulaic formula of the random-effects columns, e.g. ``"1 + Days"``; ``"0 + Days"`` or
            ``"Days - 1"`` have no intercept, ``"Days"`` has one (as in lme4).
        group: the grouping factor: a column name, or ``"g1:g2"`` for the interaction of columns (one level per pair
            of ids, written ``"id1:id2"``).
        correlated: ``False`` for lme4's ``(terms || group)``: the effects of the term are independent (a diagonal
            covariance) instead of correlated.

    Example::

        term = RandomTerm("1 + Days", "Subject")
        str(term), term.group_columns, term.has_intercept    # ("(1 + Days | Subject)", ("Subject",), True)
    """

    terms: str
    group: str
    correlated: bool = True

    def __str__(self) -> str:
        group = ":".join(map(_quoted, self.group_columns))
        return f"({self.terms} {'|' if self.correlated else '||'} {group})"

    @property
    def group_columns(self) -> tuple[str, ...]:
        """The data columns whose ids (joined with ``":"``) make the grouping factor's levels."""
        return tuple(self.group.split(":"))

    @property
    def has_intercept(self) -> bool:
        """Whether the term has a random intercept (formulaic's reading of ``terms``: ``0 +`` and ``- 1`` remove it)."""
        return any(str(term) == "1" for term in Formula(self.terms))


@dataclass(frozen=True)
class MixedFormula:
    """A parsed lme4-style formula (see :func:`parse_mixed_formula`).

    Args:
        response: the response column (the left-hand side).
        fixed: the fixed part of the right-hand side, a formulaic formula such as ``"x1 + C(x2)"``; ``"1"`` when the
            formula has only random terms.
        random: the random terms, in formula order, with nested groups expanded (``(1 | a/b)`` is
            ``(1 | a) + (1 | a:b)``).

    Example::

        formula = parse_mixed_formula("Reaction ~ Days + (Days | Subject)")
        formula.fixed, formula.random   # ("Days", (RandomTerm(terms="Days", group="Subject", correlated=True),))
        str(formula)                    # "Reaction ~ Days + (Days | Subject)"
    """

    response: str
    fixed: str
    random: tuple[RandomTerm, ...] = ()

    def __str__(self) -> str:
        return " + ".join([f"{_quoted(self.response)} ~ {self.fixed}", *map(str, self.random)])


@dataclass
class FactorDesign:
    """The random-effects design of one random term (one grouping factor).

    Args:
        term: the random term.
        Z: ``float64 (N, q)`` random-effects columns of every row (from formulaic on ``term.terms``).
        names: the ``q`` column names, lme4 style: ``"(Intercept)"``, ``"Days"``.
        codes: ``int64 (N,)`` level index of every row in ``levels``; ``-1`` for a level not in the vocabulary given
            to :func:`build_design` (a group unseen in training).
        levels: the vocabulary: level ids as text, ordered like :class:`~monai_armed.transforms.ClusterVocabulary`
            (numerically when all ids are distinct integers, as text otherwise).
        correlated: ``False`` for ``||`` terms (independent effects: a diagonal covariance).
        counts: ``int64 (L,)`` number of rows of the data at each level (rows of unseen levels are not counted).
        constant_columns: names of the non-intercept columns of ``Z`` that do not vary over the rows (a singular
            covariance if estimated; the model layer decides what to do).
        spec: formulaic's model spec of ``Z``, which rebuilds the same columns on new data.

    Example::

        design = build_design("y ~ x + (1 + x | site)", frame)
        factor = design.factors["site"]
        factor.Z.shape, factor.names, factor.levels   # ((N, 2), ["(Intercept)", "x"], ["A", "B", "C"])
    """

    term: RandomTerm
    Z: np.ndarray
    names: list[str]
    codes: np.ndarray
    levels: list[str]
    correlated: bool
    counts: np.ndarray
    constant_columns: list[str]
    spec: ModelSpec = field(repr=False)

    @property
    def group(self) -> str:
        """The grouping factor (``term.group``)."""
        return self.term.group

    @property
    def n_levels(self) -> int:
        """The number of levels in the vocabulary."""
        return len(self.levels)


@dataclass
class MixedDesign:
    """Numpy design matrices of a mixed model on one data set (see :func:`build_design`).

    Args:
        formula: the parsed formula.
        response: the response column.
        y: ``float64 (N,)`` response; ``None`` when built with ``require_response=False`` on data without it.
        X: ``float64 (N, p)`` fixed-effects design (formulaic).
        fixed_names: the ``p`` column names, the intercept as ``"(Intercept)"``, others as formulaic writes them
            (``"x1"``, ``"C(x2)[T.b]"``, ``"I(x ** 2)"``).
        fixed_spec: formulaic's model spec of ``X``: rebuilds the same columns on new data (``build_design(like=...)``).
        factors: one :class:`FactorDesign` per random term, keyed by its group (``"Subject"``, ``"site:subject"``);
            a second term on the same group gets the key ``"<group>.1"``, a third ``"<group>.2"``.
        n_rows: ``N``.
        source: the name of the data in messages (e.g. the CSV path).

    Example::

        train = build_design("Reaction ~ Days + (Days | Subject)", frame, source="sleepstudy.csv")
        train.X.shape, train.fixed_names, list(train.factors)   # ((180, 2), ["(Intercept)", "Days"], ["Subject"])
        test = build_design(None, new_frame, like=train)        # same columns and level codes as ``train``
    """

    formula: MixedFormula
    response: str
    y: np.ndarray | None
    X: np.ndarray
    fixed_names: list[str]
    fixed_spec: ModelSpec = field(repr=False)
    factors: dict[str, FactorDesign] = field(default_factory=dict)
    n_rows: int = 0
    source: str = "data"

    @property
    def vocabularies(self) -> dict[str, list[str]]:
        """The levels of every factor, keyed like ``factors`` (what ``build_design(vocabularies=...)`` takes)."""
        return {key: list(factor.levels) for key, factor in self.factors.items()}


# --------------------------------------------------------------------------------------------------------- parsing


def _scan(text: str, formula: str) -> Iterator[tuple[int, str, str | None]]:
    """Yield ``(position, char, enclosing)`` for the characters of ``text`` outside quotes, where ``enclosing`` is
    ``None`` at the top level, ``"("`` inside grouping parentheses and ``"call"`` inside a call's parentheses or
    inside brackets; brackets themselves are yielded at the level they open from."""
    stack: list[tuple[str, str]] = []
    quote = None
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
            continue
        enclosing = stack[-1][1] if stack else None
        if ch in _QUOTES:
            quote = ch
        elif ch in _CLOSERS:
            before = text[:i].rstrip()
            is_call = ch != "(" or bool(before) and (before[-1].isalnum() or before[-1] in "_.`])")
            inside_call = bool(stack) and stack[-1][1] == "call"  # I((x^2)): still Python code
            stack.append((_CLOSERS[ch], "call" if is_call or inside_call else "("))
        elif ch in ")]}":
            if not stack or stack.pop()[0] != ch:
                raise ValueError(f"unbalanced {ch!r} in formula {formula!r}.")
            enclosing = stack[-1][1] if stack else None
        yield i, ch, enclosing
    if stack or quote:
        raise ValueError(f"unclosed {quote or stack[-1][0]!r} in formula {formula!r}.")


def _python_powers(formula: str) -> str:
    """``formula`` with every ``^`` inside a call or brackets written ``**``: formulaic evaluates a call's arguments
    (``I(x^2)``, ``np.log(x^2)``) as Python, where ``^`` is the bitwise XOR (``I(day^2)`` of an integer column gave
    ``day XOR 2``), while R and lme4 read it as a power. A ``^`` between terms (``(a + b)^2``, the interactions up to
    order 2) is the formula's operator and stays."""
    calls = [i for i, ch, enclosing in _scan(formula, formula) if ch == "^" and enclosing == "call"]
    for i in reversed(calls):
        formula = f"{formula[:i]}**{formula[i + 1:]}"
    return formula


def _is_sign(before: str) -> bool:
    """Whether a ``+`` or ``-`` after ``before`` is a unary sign (or an exponent's) instead of a binary operator."""
    before = before.rstrip()
    return not before or before[-1] in "~+-*/:^(," or bool(re.search(r"(?<![A-Za-z_.])[0-9.]+[eE]$", before))


def _split_summands(rhs: str, formula: str) -> list[tuple[str, str]]:
    """Split a right-hand side at its top-level binary ``+`` and ``-`` into ``(sign, text)`` pairs."""
    summands, sign, start = [], "+", 0
    for i, ch, enclosing in _scan(rhs, formula):
        if enclosing is None and ch in "+-":
            text = rhs[start:i]
            if not text.strip():  # a leading sign belongs to the next summand
                sign = "-" if (sign == "-") != (ch == "-") else "+"
                start = i + 1
            elif not _is_sign(text):
                summands.append((sign, text.strip()))
                sign, start = ch, i + 1
    if not rhs[start:].strip():
        raise ValueError(f"formula {formula!r} ends with an operator or has nothing after '~'.")
    summands.append((sign, rhs[start:].strip()))
    return summands


def _bars(text: str, formula: str) -> list[tuple[int, int]]:
    """``(position, width)`` of the top-level ``|`` and ``||`` operators of ``text``."""
    bars: list[tuple[int, int]] = []
    for i, ch, enclosing in _scan(text, formula):
        if enclosing is None and ch == "|":
            if bars and bars[-1][0] + bars[-1][1] == i and bars[-1][1] == 1:
                bars[-1] = (bars[-1][0], 2)
            else:
                bars.append((i, 1))
    return bars


def _unwrap(text: str, formula: str) -> str | None:
    """The inside of ``text`` if all of it is one pair of grouping parentheses (``"(1 | g)"`` -> ``"1 | g"``)."""
    if not text.startswith("("):
        return None
    for i, ch, enclosing in _scan(text, formula):
        if enclosing is None and ch == ")":
            return text[1:-1] if i == len(text) - 1 else None
    return None


def _group_names(group: str, term: str, formula: str) -> list[str]:
    """The nested groups of a grouping expression: ``"a/b:c"`` -> ``["a", "a:b:c"]``, column names unquoted."""
    if not group.strip():
        raise ValueError(f"empty group in random term {term!r} of formula {formula!r}; write e.g. (1 | subject).")
    groups: list[str] = []
    for level in group.split("/"):
        columns = [part.strip() for part in level.split(":")]
        for column in columns:
            if not _NAME.fullmatch(column):
                raise ValueError(
                    f"grouping factor {group.strip()!r} of random term {term!r} in formula {formula!r} must be a "
                    "column name, 'a:b' (interaction) or 'a/b' (b nested in a); got the part "
                    f"{column!r}{' (empty)' if not column else ''}."
                )
        names = ":".join(column.strip("`") for column in columns)
        groups.append(f"{groups[-1]}:{names}" if groups else names)
    return groups


def _random_terms(inner: str, text: str, formula: str) -> list[RandomTerm]:
    """The random terms of one parenthesised bar term (several when its group is nested)."""
    bars = _bars(inner, formula)
    if len(bars) > 1:
        raise ValueError(f"random term {text!r} of formula {formula!r} has more than one '|'.")
    (position, width), = bars
    terms = inner[:position].strip()
    if not terms:
        raise ValueError(f"random term {text!r} of formula {formula!r} has no terms before '|'; e.g. (1 | group).")
    _check_formulaic(terms, f"the terms of random term {text!r}", formula)
    groups = _group_names(inner[position + width:], text, formula)
    return [RandomTerm(terms, group, correlated=width == 1) for group in groups]


def _check_formulaic(text: str, what: str, formula: str) -> None:
    """Raise a ``ValueError`` if formulaic cannot parse ``text``."""
    try:
        Formula(text)
    except FormulaicError as err:
        raise ValueError(f"{what} in formula {formula!r} is not a valid formula: {_plain(err)}") from None
    except SyntaxError as err:  # e.g. a name such as day.1 (R's read.csv names repeated columns so) inside a call
        raise ValueError(
            f"{what} in formula {formula!r} is not valid Python inside a call ({err.msg}): write a column name that is "
            "not a Python name in backticks, e.g. np.log(`day.1`)."
        ) from None


def _plain(err: BaseException) -> str:
    """An exception's message without formulaic's terminal colour codes."""
    return _ANSI.sub("", str(err)).strip()


def _misplaced_bar(text: str, formula: str) -> None:
    """Raise a ``ValueError`` if a fixed summand holds a ``|`` outside a function call (a malformed random term)."""
    for _, ch, enclosing in _scan(text, formula):
        if ch == "|" and enclosing is None:
            raise ValueError(
                f"bar term without parentheses: {text!r} in formula {formula!r}; a random term is written in "
                "parentheses, e.g. y ~ x + (1 + x | group)."
            )
        if ch == "|" and enclosing == "(":
            raise ValueError(
                f"random term inside {text!r} in formula {formula!r}: a term (terms | group) must be added on its own, "
                "e.g. y ~ x + (1 | group)."
            )


def _response(lhs: str, formula: str) -> str:
    """The response column of a left-hand side, which must be a column name."""
    lhs = lhs.strip()
    if not lhs:
        raise ValueError(f"formula {formula!r} has no response before '~'; write e.g. y ~ x + (1 | group).")
    if not _NAME.fullmatch(lhs):
        raise ValueError(
            f"the response {lhs!r} of formula {formula!r} must be a column name; compute it as a column of the "
            "data first (e.g. data['log_y'] = np.log(data['y']))."
        )
    return lhs.strip("`")


def _join_summands(summands: list[tuple[str, str]]) -> str:
    """The right-hand side of ``(sign, text)`` summands (``"1"`` if there are none)."""
    if not summands:
        return "1"
    (sign, first), rest = summands[0], summands[1:]
    return "".join([f"-{first}" if sign == "-" else first, *(f" {sign} {text}" for sign, text in rest)])


def parse_mixed_formula(formula: str) -> MixedFormula:
    """Parse an lme4-style mixed-model formula.

    Random terms are the summands of the right-hand side written ``(terms | group)`` (correlated effects) or
    ``(terms || group)`` (independent effects: one variance per column of the terms, so for a categorical ``f`` the
    variances of the intercept and of ``f``'s contrasts, where lme4 makes ``(1 | g) + (0 + f | g)``, see
    :func:`build_design`); they are found by matching parentheses, so function calls such as ``C(x2)``, ``I(x^2)``
    (a power, as in R: ``^`` inside a call is written ``**`` for formulaic) or ``np.log(x)`` stay in the fixed part.
    A group ``a/b`` (``b`` nested in ``a``) expands as in lme4 into the groups ``a`` and ``a:b``; ``a:b`` is the
    interaction factor whose levels are the pairs of ids. An ``offset(...)`` is refused (not supported).
    The fixed part keeps the other summands as written (``"0 +"`` and ``"- 1"`` remove the intercept, as formulaic
    reads them); it is ``"1"`` when there are none.

    Args:
        formula: e.g. ``"y ~ x1 + C(x2) + (1 + Days | Subject) + (1 | site)"``.

    Returns:
        the response column, the fixed part and the random terms.

    Raises:
        ValueError: naming the problem and showing the formula, when there is no ``~`` (or more than one), no
            response or a response that is not a column name, unbalanced parentheses or quotes, a ``|`` outside
            parentheses, a random term subtracted or inside another expression, a random term without terms or with an
            empty or malformed group, or a fixed part or random terms that formulaic cannot parse.

    Example::

        parse_mixed_formula("y ~ x1 + C(x2) + (1 + Days | Subject) + (1 | site)")
        # MixedFormula(response="y", fixed="x1 + C(x2)", random=(RandomTerm("1 + Days", "Subject", True),
        #                                                          RandomTerm("1", "site", True)))
        parse_mixed_formula("y ~ x + (x || site/subject)").random
        # (RandomTerm("x", "site", False), RandomTerm("x", "site:subject", False))
    """
    if not isinstance(formula, str):
        raise TypeError(f"a formula must be a string, got {type(formula).__name__}.")
    if any(called and m.group() == "offset" for m, called in _name_matches(formula)):
        raise ValueError(
            f"formula {formula!r} has an offset(...) term, which is not supported: fit the rate without it, or give "
            "the known exposure as a covariate (e.g. + np.log(exposure))."
        )
    text = _python_powers(formula)
    tildes = [i for i, ch, enclosing in _scan(text, formula) if ch == "~" and enclosing is None]
    if len(tildes) != 1:
        problem = "no '~'" if not tildes else "more than one '~'"
        raise ValueError(f"formula {formula!r} has {problem}; write it as response ~ terms, e.g. y ~ x + (1 | group).")
    response = _response(text[: tildes[0]], formula)
    fixed: list[tuple[str, str]] = []
    random: list[RandomTerm] = []
    for sign, text in _split_summands(text[tildes[0] + 1:], formula):
        inner = _unwrap(text, formula)
        while inner is not None and not _bars(inner, formula) and _unwrap(inner.strip(), formula) is not None:
            inner = _unwrap(inner.strip(), formula)  # ((1 | g)) is (1 | g)
        if inner is not None and _bars(inner, formula):
            if sign == "-":
                raise ValueError(f"random term {text!r} of formula {formula!r} is subtracted; random terms are added.")
            random.extend(_random_terms(inner, text, formula))
        else:
            _misplaced_bar(text, formula)
            fixed.append((sign, text))
    fixed_text = _join_summands(fixed)
    _check_formulaic(fixed_text, f"the fixed part {fixed_text!r}", formula)
    return MixedFormula(response, fixed_text, tuple(random))


# ----------------------------------------------------------------------------------------------------------- design


def _columns_text(data: pd.DataFrame, limit: int = 30) -> str:
    """The data's column names for a message (the first ``limit`` of them)."""
    names = [str(c) for c in data.columns]
    return f"{names}" if len(names) <= limit else f"{names[:limit]} ... ({len(names)} in all)"


def _row_text(data: pd.DataFrame, position: int) -> str:
    """A row for a message: its 0-based position, and its index label when that differs."""
    label = data.index[position]
    return f"row {position}" if label == position else f"row {position} (index {label!r})"


def _variables(text: str) -> list[str]:
    """The data columns a formulaic formula names, as far as formulaic knows them before evaluation (a dotted name such
    as ``day.c`` is reported by its first part, ``day``: :func:`_check_columns` resolves it against the data)."""
    variables = Formula(text).required_variables
    return sorted(str(v) for v in variables if any(role.value == "value" for role in v.roles))


def _name_matches(text: str) -> list[tuple[re.Match, bool]]:
    """The names of ``text`` outside quotes (backticked ones included), each with whether it is called (followed by
    ``(``, e.g. ``np.log`` or ``day.mean()``)."""
    outside = {i for i, _, _ in _scan(text, text)}
    return [(m, text[m.end():].lstrip().startswith("(")) for m in _NAME.finditer(text) if m.start() in outside]


def _names(text: str) -> set[str]:
    """The names of ``text`` that may be columns: outside quotes, backticks removed, not called."""
    return {m.group().strip("`") for m, called in _name_matches(text) if not called}


def _quote_columns(text: str, columns: Sequence[Any]) -> str:
    """``text`` with each dotted column name backticked, which formulaic needs inside a call (``np.log(day.c)`` would
    read ``day.c`` as the attribute ``c`` of ``day``); of a method call such as ``day.c.mean()``, the longest dotted
    prefix that is a column."""
    names = set(map(str, columns))
    for match, called in reversed(_name_matches(text)):
        if match.group().startswith("`"):
            continue
        parts = match.group().split(".")
        for k in range(len(parts) - called, 1, -1):  # of a call, only a prefix: day.c of day.c.mean()
            prefix = ".".join(parts[:k])
            if prefix in names:
                end = match.start() + len(prefix)
                text = f"{text[:match.start()]}`{prefix}`{text[end:]}"
                break
    return text


def _used_columns(formula: MixedFormula, require_response: bool) -> list[tuple[str, str, str]]:
    """``(column, what uses it, its text)`` for the response, the fixed summands and the random terms, in formula
    order."""
    used = [(formula.response, f"the response of formula {str(formula)!r}", formula.response)] if require_response else []
    for _, text in _split_summands(formula.fixed, formula.fixed):
        used += [(column, f"term {text!r}", text) for column in _variables(text)]
    for term in formula.random:
        used += [(column, f"term {str(term)!r}", term.terms) for column in [*_variables(term.terms), *term.group_columns]]
    return used


def _check_columns(used: list[tuple[str, str, str]], data: pd.DataFrame, source: str) -> None:
    """Raise a ``ValueError`` for the first used column that the data does not have or that has a missing value. A
    name formulaic reports by the first part of a dotted name (``day`` of ``day.c``) is the dotted column of the text
    when the data has one."""
    first_use: dict[str, str] = {}
    for column, what, text in used:
        names = _names(text)
        dotted = sorted(name for name in names if name.startswith(f"{column}.") and name in data.columns)
        own = column in data.columns and (column in names or not dotted)  # not only the first part of a dotted name
        if not own and not dotted:
            raise ValueError(f"column {column!r} of {what} is not in {source}; columns: {_columns_text(data)}.")
        for name in [column] * own + dotted:
            first_use.setdefault(name, what)
    for column, what in first_use.items():
        _check_complete(data, column, what, source)


def _check_complete(data: pd.DataFrame, column: str, what: str, source: str) -> None:
    """Raise a ``ValueError`` naming the column and the first row where it is missing (NaN, None) or infinite."""
    series = data[column]
    bad = series.isna().to_numpy()
    problem = "missing value(s) (NaN)"
    if not bad.any() and pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series):
        bad = ~np.isfinite(series.to_numpy(dtype=np.float64))
        problem = "infinite value(s)"
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"column {column!r} of {what} has {int(bad.sum())} {problem} in {source}, the first in "
            f"{_row_text(data, first)}; drop or fill those rows first."
        )


def _response_values(data: pd.DataFrame, column: str, source: str) -> np.ndarray:
    """The response column as ``float64`` (numbers or their text); a ``ValueError`` names the first value that is
    not a number."""
    series = data[column]
    if pd.api.types.is_numeric_dtype(series):
        return series.to_numpy(dtype=np.float64)
    numbers = pd.to_numeric(series, errors="coerce")  # numbers read as text (dtype=str) are fine
    if not numbers.isna().any():
        return numbers.to_numpy(dtype=np.float64)
    first = int(np.flatnonzero(numbers.isna().to_numpy())[0])
    raise ValueError(
        f"response column {column!r} in {source} is not numeric: {series.iloc[first]!r} in {_row_text(data, first)}; "
        "encode a categorical response as numbers (e.g. 0/1) first."
    )


def _model_matrix(formula: str | ModelSpec, data: pd.DataFrame, what: str, source: str) -> tuple[np.ndarray, list[str], ModelSpec]:
    """``(matrix, names, spec)`` of a formulaic formula, or of a model spec from training, on ``data``.

    The intercept column is named ``"(Intercept)"``. A category that the spec's training data did not have raises a
    ``ValueError`` (formulaic would only warn and give the row zeros, as if it had the reference category).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataMismatchWarning)
        try:
            if isinstance(formula, ModelSpec):
                matrix = formula.get_model_matrix(data)
            else:
                matrix = Formula(_quote_columns(formula, data.columns)).get_model_matrix(data, na_action="raise")
        except DataMismatchWarning as err:
            raise ValueError(
                f"{what}: {source} has a category that the training data did not have, so it has no column: "
                f"{_plain(err)}"
            ) from None
        except (FormulaicError, ValueError) as err:
            hint = " (write x**-1.0 or 1/x: numpy raises integers only to non-negative integer powers)" if (
                "negative integer powers" in str(err)) else ""  # fmt: skip
            raise ValueError(f"cannot build {what} from {source}: {_plain(err)}{hint}") from None
    spec = matrix.model_spec
    names = [str(name) for name in matrix.columns]
    for term, columns in spec.term_slices.items():
        if str(term) == "1":
            names[columns] = [INTERCEPT] * len(names[columns])
    return np.asarray(matrix, dtype=np.float64).reshape(len(data), len(names)), names, spec


def _id_text(value: Any, where: str) -> str:
    """The text id of one raw grouping value: whole floats (``3.0``) as integers (``"3"``), the rest as
    :func:`~monai_armed.utils.cluster_id` writes them."""
    value = value.item() if isinstance(value, np.generic) else value
    if isinstance(value, bool):
        raise ValueError(f"{where}: the ids are True/False; convert the column to strings to use it as a group.")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(
                f"{where}: {value!r} is not a whole number, so the column looks like a continuous variable; a grouping "
                "factor needs discrete ids: convert the column to a factor of strings (e.g. "
                "data[column] = data[column].astype(str)) or read the file with dtype=str."
            )
        return str(int(value))
    return cluster_id(value, where)


def _column_ids(data: pd.DataFrame, column: str, term: RandomTerm, source: str) -> np.ndarray:
    """The text id of every row in one grouping column (an object array)."""
    codes, uniques = pd.factorize(data[column])
    _, first_rows = np.unique(codes, return_index=True)
    texts = [
        _id_text(value, f"grouping column {column!r} of term {str(term)!r} in {source}, {_row_text(data, int(row))}")
        for value, row in zip(uniques, first_rows)
    ]
    return np.asarray(texts, dtype=object)[codes]


def _group_ids(data: pd.DataFrame, term: RandomTerm, source: str) -> np.ndarray:
    """The level id of every row for a random term's group: one column's ids, or ``"id1:id2"`` for ``g1:g2``."""
    ids = None
    for column in term.group_columns:
        column_ids = _column_ids(data, column, term, source)
        ids = column_ids if ids is None else ids + ":" + column_ids
    return ids


def _learn_levels(ids: np.ndarray, key: str, source: str) -> list[str]:
    """The vocabulary of training ids; a ``ValueError`` when there are fewer than two levels."""
    distinct = pd.unique(ids)
    if len(distinct) < 2:
        shown = ", ".join(repr(str(level)) for level in distinct)
        raise ValueError(
            f"a random effect needs >= 2 levels; factor {key!r} has {len(distinct)} ({shown}) in {source}. Drop the "
            "random term, or use data with more groups."
        )
    return ClusterVocabulary.from_ids(distinct).clusters


def _constant_columns(Z: np.ndarray, names: list[str]) -> list[str]:
    """Names of the non-intercept columns of ``Z`` that take one value on every row."""
    if not len(Z):
        return []
    return [name for name, spread in zip(names, np.ptp(Z, axis=0)) if name != INTERCEPT and spread == 0]


def _factor(
    term: RandomTerm, key: str, data: pd.DataFrame, source: str, levels: Sequence[str] | None, spec: ModelSpec | None
) -> FactorDesign:
    """The design of one random term; ``levels`` and ``spec`` come from training, or are learnt when ``None``."""
    ids = _group_ids(data, term, source)
    levels = _learn_levels(ids, key, source) if levels is None else ClusterVocabulary(levels).clusters
    codes = pd.Index(levels, dtype=object).get_indexer(ids).astype(np.int64)
    counts = np.bincount(codes[codes >= 0], minlength=len(levels)).astype(np.int64)
    what = f"the random-effects columns of term {str(term)!r}"
    learn = spec is None
    Z, names, spec = _model_matrix(term.terms if spec is None else spec, data, what, source)
    categorical = sorted(map(str, spec.factor_contrasts))
    if learn and categorical and not term.correlated:
        logger.warning(
            f"random term {str(term)!r} has the categorical variable(s) {categorical}: it gets one independent "
            f"variance per column of {names}, where lme4 expands a factor f in a '||' term into (1 | {term.group}) + "
            f"(0 + f | {term.group}) (or (0 + f | {term.group}) alone without the intercept), with a full covariance "
            "over f's levels; write that form to fit lme4's model."
        )
    return FactorDesign(term, Z, names, codes, levels, term.correlated, counts, _constant_columns(Z, names), spec)


def _factor_keys(terms: Sequence[RandomTerm]) -> list[str]:
    """``factors`` keys: the group, then ``"<group>.1"``, ``"<group>.2"`` for further terms on the same group."""
    seen: dict[str, int] = {}
    keys = []
    for term in terms:
        n = seen.get(term.group, 0)
        seen[term.group] = n + 1
        keys.append(term.group if n == 0 else f"{term.group}.{n}")
    return keys


def _resolve_formula(formula: str | MixedFormula | None, like: MixedDesign | None) -> MixedFormula:
    """The parsed formula; with ``like``, the training design's (a different formula is an error)."""
    if formula is None:
        if like is None:
            raise ValueError("build_design needs a formula, or like= (a design built on the training data).")
        return like.formula
    parsed = formula if isinstance(formula, MixedFormula) else parse_mixed_formula(formula)
    if like is not None and parsed != like.formula:
        raise ValueError(
            f"formula {str(parsed)!r} differs from the formula {str(like.formula)!r} of the like= design; pass "
            "formula=None to use the training formula."
        )
    return parsed


def _vocabularies(
    keys: list[str], vocabularies: Mapping[str, Sequence[str]] | None, like: MixedDesign | None
) -> dict[str, Sequence[str] | None]:
    """The vocabulary of every factor key: given, from ``like``, or ``None`` (learnt from the data)."""
    known = dict(like.vocabularies) if like is not None else {}
    if vocabularies is not None:
        unknown = sorted(set(vocabularies) - set(keys))
        if unknown:
            raise ValueError(f"vocabularies has entries {unknown} that are not factors of the formula; factors: {keys}.")
        known.update(vocabularies)
        missing = [key for key in keys if key not in known]
        if missing:
            raise ValueError(f"vocabularies has no entry for factor(s) {missing}; factors: {keys}.")
    return {key: known.get(key) for key in keys}


def build_design(
    formula: str | MixedFormula | None,
    data: pd.DataFrame,
    *,
    like: MixedDesign | None = None,
    vocabularies: Mapping[str, Sequence[str]] | None = None,
    source: str = "data",
    require_response: bool = True,
) -> MixedDesign:
    """Build the numpy design matrices of a mixed-model formula on a ``DataFrame``.

    ``X`` comes from formulaic on the fixed part, each ``Z`` from formulaic on a random term's terms, and each
    grouping factor's level ids are text (:func:`~monai_armed.utils.cluster_id`: ``"01"``, ``"001"`` and ``"1"`` are
    three levels when read as strings; an integer ``1`` is ``"1"``; a float column of whole numbers such as ``3.0`` gives
    ``"3"``, as pandas makes an integer column float). Rows are never dropped: a missing value is an error.

    On training data, the levels of each factor are learnt (sorted like
    :class:`~monai_armed.transforms.ClusterVocabulary`). On new data (validation, test, inference) pass ``like=`` the
    training design: the fixed columns, the random-effects columns and the level codes are those of training, even
    when a category or a group is absent from the new data; a group the training data did not have gets the code
    ``-1`` (unseen). ``vocabularies`` gives (or, with ``like``, overrides) the levels of factors, e.g. read back from a
    saved vocabulary.

    Args:
        formula: an lme4-style formula (see :func:`parse_mixed_formula`) or a parsed one; ``None`` with ``like`` uses
            the training formula.
        data: one row per sample, with the columns the formula names.
        like: the design built on the training data, whose columns, levels and formula are reused.
        vocabularies: the levels of each factor, keyed like :attr:`MixedDesign.factors` (``"Subject"``,
            ``"site:subject"``); rows at other levels get the code ``-1``. Without ``like``, every factor needs one.
        source: the name of the data in error messages, e.g. the CSV path.
        require_response: ``False`` allows data without the response column, or with missing values in it
            (inference, unknown outcomes): ``y`` is then ``None``.

    Returns:
        the design: ``y``, ``X`` with ``fixed_names`` and ``fixed_spec``, and one :class:`FactorDesign` per random term.

    Raises:
        ValueError: naming ``source`` and the column, when a column of the formula is not in the data (naming the
            term too), a used column has a missing (NaN, None) or infinite value (naming the first row), the response is
            not numeric, a grouping column holds non-integer numbers (a continuous variable) or True/False, a grouping
            factor of training data has fewer than two levels, the new data has a category of a fixed or
            random-effects categorical variable that training did not have, or formulaic cannot evaluate a term; also
            for a formula that differs from ``like``'s and for vocabularies that miss a factor or name an unknown one.

    Example::

        train = build_design("Reaction ~ Days + (Days | Subject)", frame, source="sleepstudy.csv")
        train.y.shape, train.X.shape, train.fixed_names        # ((180,), (180, 2), ["(Intercept)", "Days"])
        subject = train.factors["Subject"]
        subject.names, subject.levels[:2], subject.codes[:3]   # (["(Intercept)", "Days"], ["308", "309"], [0, 0, 0])
        test = build_design(None, new_frame, like=train, source="new.csv")   # an unseen subject has the code -1
    """
    if not isinstance(data, pd.DataFrame):
        raise TypeError(f"build_design needs a pandas DataFrame, got {type(data).__name__}.")
    parsed = _resolve_formula(formula, like)
    # without require_response (prediction) a response column is read only when complete: NaN marks unknown outcomes
    has_response = require_response or (parsed.response in data.columns and not data[parsed.response].isna().any())
    used = _used_columns(parsed, has_response)
    _check_columns(used, data, source)
    y = _response_values(data, parsed.response, source) if has_response else None
    X, fixed_names, fixed_spec = _model_matrix(
        parsed.fixed if like is None else like.fixed_spec, data, f"the fixed-effects columns {parsed.fixed!r}", source
    )
    keys = _factor_keys(parsed.random)
    levels = _vocabularies(keys, vocabularies, like)
    factors = {
        key: _factor(term, key, data, source, levels[key], None if like is None else like.factors[key].spec)
        for key, term in zip(keys, parsed.random)
    }
    return MixedDesign(parsed, parsed.response, y, X, fixed_names, fixed_spec, factors, len(data), source)
