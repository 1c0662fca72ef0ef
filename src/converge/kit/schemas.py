"""Base schemas. Every request body derives from `Input`, so what the database cannot store is
refused here, once, as a 422 that names the field, instead of as a 500 from the driver."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, field_validator
from pydantic_core import PydanticCustomError

INT32_MAX = 2**31 - 1  # PostgreSQL INTEGER
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # BIGINT; integers kept in JSONB are held to it too
# PostgreSQL text cannot hold U+0000; a lone surrogate cannot be encoded as UTF-8 at all.
_UNSTORABLE_CHAR = re.compile("[\x00\ud800-\udfff]")


def text_problem(value: str) -> str | None:
    """Why `value` cannot be stored as text, or None when it can."""
    found = _UNSTORABLE_CHAR.search(value)
    if found is None:
        return None
    if found.group() == "\x00":
        return "Text must not contain NUL (\\u0000) characters"
    return "Text must be valid Unicode, without unpaired surrogates (\\ud800-\\udfff)"


def value_problem(value: Any, where: str = "") -> str | None:
    """Why a validated value (or anything nested in it) cannot be stored, or None when it can.

    Nested `Input` models are skipped: they check their own fields, with their own locations."""
    at = f" (at {where})" if where else ""
    if isinstance(value, str):
        problem = text_problem(value)
        return f"{problem}{at}" if problem else None
    if isinstance(value, bool) or isinstance(value, BaseModel) or value is None:
        return None
    if isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            return f"Integers must be between {INT64_MIN} and {INT64_MAX}{at}"
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"Numbers must be finite (no Infinity or NaN){at}"
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and (problem := text_problem(key)):
                return f"{problem} (in a key{at})"
            if problem := value_problem(item, f"{where}.{key}" if where else str(key)):
                return problem
        return None
    if isinstance(value, list | tuple | set | frozenset):
        for i, item in enumerate(value):
            if problem := value_problem(item, f"{where}[{i}]"):
                return problem
    return None


class Input(BaseModel):
    """Request bodies: unknown fields are an error, not silently dropped; numbers are finite;
    text is storable (no NUL, no lone surrogates) and integers fit a BIGINT, in every field at
    every depth (lists, dicts and their keys included)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _storable(cls, value: Any) -> Any:
        if problem := value_problem(value):
            raise PydanticCustomError("unstorable_value", problem)
        return value


class Output(BaseModel):
    model_config = ConfigDict(from_attributes=True)


def _param_errors(location: str, items: Iterable[tuple[str, str]]) -> list[dict[str, Any]]:
    errors = []
    for name, value in items:
        if problem := text_problem(name) or text_problem(str(value)):
            errors.append(
                {"type": "unstorable_value", "loc": (location, name), "msg": problem, "input": value}
            )
    return errors


async def storable_parameters(request: Request) -> None:
    """An app-wide dependency: query and path parameters follow the same text rule as bodies,
    before any route's own dependencies (or its SQL) see them."""
    errors = _param_errors("query", request.query_params.multi_items())
    errors += _param_errors("path", request.path_params.items())
    if errors:
        raise RequestValidationError(errors)
