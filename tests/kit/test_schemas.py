"""The `Input` base refuses what PostgreSQL cannot store, in every field, at every depth."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from converge.kit.schemas import INT64_MAX, INT64_MIN, Input, text_problem, value_problem


class Inner(Input):
    text: str = ""


class Body(Input):
    name: str = ""
    count: int = 0
    ratio: float = 0.0
    inner: Inner = Inner()
    tags: list[str] = []
    labels: dict[str, str] = {}
    anything: dict[str, object] = {}


def _errors(**data: object) -> list[tuple[tuple[object, ...], str]]:
    with pytest.raises(ValidationError) as info:
        Body.model_validate(data)
    return [(e["loc"], e["type"]) for e in info.value.errors()]


@pytest.mark.parametrize("text", ["a\x00b", "\x00", "broken \ud800", "\udfff"])
def test_text_with_nul_or_a_lone_surrogate_is_refused(text):
    assert text_problem(text) is not None
    # pydantic itself refuses a lone surrogate in a `str` field; `Input` catches the rest.
    assert [loc for loc, _ in _errors(name=text)] == [("name",)]
    assert _errors(anything={"k": text}) == [(("anything",), "unstorable_value")]


@pytest.mark.parametrize("text", ["", "plain", "émoji 🙂", "tab\tand newline\n", "\U0010ffff"])
def test_ordinary_unicode_is_storable(text):
    assert text_problem(text) is None
    Body(name=text)


def test_the_location_names_the_nested_field():
    assert _errors(inner={"text": "x\x00"}) == [(("inner", "text"), "unstorable_value")]


def test_lists_dict_values_and_dict_keys_are_checked():
    assert _errors(tags=["ok", "no\x00"]) == [(("tags",), "unstorable_value")]
    assert _errors(labels={"k": "v\x00"}) == [(("labels",), "unstorable_value")]
    assert _errors(labels={"k\x00": "v"}) == [(("labels",), "unstorable_value")]


def test_free_form_json_is_checked_all_the_way_down():
    problem = value_problem({"a": [{"b": "\x00"}]})

    assert problem is not None and "a[0].b" in problem
    assert _errors(anything={"a": [1, {"b": float("inf")}]}) == [(("anything",), "unstorable_value")]
    assert _errors(anything={"n": 2**64}) == [(("anything",), "unstorable_value")]


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), "Infinity", "NaN"])
def test_numbers_must_be_finite(value):
    assert _errors(ratio=value) == [(("ratio",), "finite_number")]


@pytest.mark.parametrize("value", [INT64_MAX + 1, INT64_MIN - 1, 10**30])
def test_integers_must_fit_a_bigint(value):
    assert _errors(count=value) == [(("count",), "unstorable_value")]


def test_the_bigint_bounds_themselves_are_accepted():
    assert Body(count=INT64_MAX).count == INT64_MAX
    assert Body(count=INT64_MIN).count == INT64_MIN


def test_booleans_are_not_mistaken_for_integers():
    assert value_problem(True) is None


def test_unknown_fields_are_still_an_error_and_text_is_still_stripped():
    assert _errors(nope=1) == [(("nope",), "extra_forbidden")]
    assert Body(name="  x  ").name == "x"
