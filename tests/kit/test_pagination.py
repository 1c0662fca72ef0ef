"""Cursors: what `page_of` wrote decodes; anything else is a 400 before it reaches SQL."""

from __future__ import annotations

import uuid

import pytest

from converge.errors import BadRequest
from converge.kit.pagination import PageParams, decode_cursor, encode_cursor, int_after, uuid_after


def test_a_cursor_round_trips_a_uuid_and_an_integer():
    key = uuid.uuid4()

    assert uuid_after(PageParams(limit=1, after=decode_cursor(encode_cursor(key)))) == key
    assert int_after(PageParams(limit=1, after=decode_cursor(encode_cursor(42)))) == 42


@pytest.mark.parametrize(
    "cursor",
    ["é", "ＡＡＡＡ", "MTIz\u0661", "__8", "AAAA", "x" * 200, "====", "!!!!"],
    ids=["latin", "fullwidth", "arabic-digit", "not-utf8", "nul", "too-long", "only-padding", "no-base64"],
)
def test_garbage_is_a_bad_request(cursor):
    with pytest.raises(BadRequest, match="Invalid cursor"):
        decode_cursor(cursor)


def test_a_decoded_cursor_of_the_wrong_type_is_a_bad_request():
    with pytest.raises(BadRequest):
        uuid_after(PageParams(limit=1, after="not-a-uuid"))
    with pytest.raises(BadRequest):
        int_after(PageParams(limit=1, after="12x"))


@pytest.mark.parametrize("value", [-1, 2**63])
def test_an_integer_cursor_must_be_a_bigint_id(value):
    with pytest.raises(BadRequest):
        int_after(PageParams(limit=1, after=str(value)))
