"""Keyset pagination: an opaque cursor over a time-ordered, unique key."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Sequence
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Depends, Query
from pydantic import BaseModel

from converge.errors import BadRequest
from converge.kit.schemas import INT64_MAX, text_problem

T = TypeVar("T")
MAX_LIMIT = 500


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = None


class PageParams(BaseModel):
    limit: int
    after: str | None  # decoded cursor value


def encode_cursor(value: object) -> str:
    return base64.urlsafe_b64encode(str(value).encode()).decode().rstrip("=")


INVALID_CURSOR = "Invalid cursor: pass back the next_cursor value of a previous page"
# A cursor holds one key (a UUID is 48 characters encoded); anything much longer is not ours.
MAX_CURSOR_LENGTH = 128


def decode_cursor(cursor: str) -> str:
    """The key inside a cursor. Garbage (non-ASCII, not base64, not UTF-8, unstorable) is a 400;
    the caller still parses the key into its type (`uuid_after`, `int_after`)."""
    if len(cursor) > MAX_CURSOR_LENGTH or not cursor.isascii():
        raise BadRequest(INVALID_CURSOR)
    try:
        value = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except ValueError as exc:  # binascii.Error and UnicodeDecodeError are ValueErrors
        raise BadRequest(INVALID_CURSOR) from exc
    if not value or text_problem(value):
        raise BadRequest(INVALID_CURSOR)
    return value


def page_params(
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Items per page")] = 50,
    cursor: Annotated[str | None, Query(description="next_cursor from the previous page")] = None,
) -> PageParams:
    return PageParams(limit=limit, after=decode_cursor(cursor) if cursor else None)


PageDep = Annotated[PageParams, Depends(page_params)]


def uuid_after(params: PageParams) -> uuid.UUID | None:
    if params.after is None:
        return None
    try:
        return uuid.UUID(params.after)
    except ValueError as exc:
        raise BadRequest(INVALID_CURSOR) from exc


def int_after(params: PageParams, *, minimum: int = 0) -> int | None:
    """An integer key (a BIGINT id), or a 400 when the cursor holds anything else."""
    if params.after is None:
        return None
    try:
        value = int(params.after)
    except ValueError as exc:
        raise BadRequest(INVALID_CURSOR) from exc
    if not minimum <= value <= INT64_MAX:
        raise BadRequest(INVALID_CURSOR)
    return value


# Built once: pydantic keeps parametrised generics only weakly, so `Page[Any]` inside a
# function was rebuilt after every garbage collection (about 1 ms each time).
AnyPage = Page[Any]


def page_of(rows: Sequence[Any], *, limit: int, schema: type[BaseModel], key: str = "id") -> Page[Any]:
    """`rows` was fetched with limit + 1: the extra row only says whether a next page exists."""
    more = len(rows) > limit
    shown = rows[:limit]
    cursor = encode_cursor(getattr(shown[-1], key)) if more and shown else None
    return AnyPage(items=[schema.model_validate(r) for r in shown], next_cursor=cursor)
