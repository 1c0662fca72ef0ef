"""Compile and run single CEL expressions, turning the library's loose errors into ours.

The CEL binding reports a syntax error as a plain ``ValueError`` whose text holds
``<input>:LINE:COL`` and reports runtime failures as assorted built-in exceptions (KeyError,
TypeError, RuntimeError, OverflowError, ...). Callers here need exactly two outcomes: a
``PolicySyntaxError`` they can show next to the offending line, or a
``PolicyEvaluationError`` that the engine records as a fail-closed "error" outcome.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import cel

# The first diagnostic is the one a person should fix first; later ones often cascade from it.
_LOCATION = re.compile(r"<input>:(\d+):(\d+):\s*(?P<message>[^\n]*)")
# Bounds what ends up in decisions and audit records when CEL emits a long hint.
_MAX_ERROR_TEXT = 300


class PolicyError(ValueError):
    """Base for problems with a policy rule; a ValueError so callers can map it to a 4xx."""


class PolicySyntaxError(PolicyError):
    """The expression does not parse. ``line`` and ``column`` are 1-based, None if unknown."""

    def __init__(self, message: str, *, line: int | None, column: int | None) -> None:
        self.message = message
        self.line = line
        self.column = column
        where = f" (line {line}, column {column})" if line is not None else ""
        super().__init__(f"{message}{where}")


class PolicyEvaluationError(PolicyError):
    """The expression parsed but could not produce a boolean for these facts."""


@dataclass(frozen=True, slots=True)
class CompiledExpression:
    """A parsed CEL program that answers true/false for a facts mapping."""

    source: str
    # Identity is the source text; the native program object is neither comparable nor useful in a repr.
    program: cel.Program = field(compare=False, repr=False)

    def evaluate(self, facts: Mapping[str, Any]) -> bool:
        try:
            result = self.program.execute(dict(facts))
        except BaseException as exc:
            if not _is_engine_failure(exc):
                raise
            raise PolicyEvaluationError(_describe(exc)) from exc
        # CEL happily returns null, ints or strings (e.g. `source.known` when the fact is
        # null); treating those as truthy/falsy would let a typo silently pass a deny rule.
        if not isinstance(result, bool):
            raise PolicyEvaluationError(f"expression returned {type(result).__name__}, expected bool")
        return result


def compile_expression(expression: str) -> CompiledExpression:
    """Parse ``expression`` once; repeated rules share the cached program."""
    return _compile_cached(expression)


@functools.lru_cache(maxsize=1024)
def _compile_cached(expression: str) -> CompiledExpression:
    try:
        program = cel.compile(expression)
    except ValueError as exc:
        raise _syntax_error(str(exc)) from None
    return CompiledExpression(source=expression, program=program)


def _syntax_error(text: str) -> PolicySyntaxError:
    match = _LOCATION.search(text)
    if match is None:
        return PolicySyntaxError(_truncate(text), line=None, column=None)
    return PolicySyntaxError(_truncate(match["message"].strip()), line=int(match[1]), column=int(match[2]))


def _is_engine_failure(exc: BaseException) -> bool:
    # A Rust panic inside the binding arrives as pyo3's PanicException, which derives from
    # BaseException; it must fail the rule closed, while Ctrl-C and exits still propagate.
    return isinstance(exc, Exception) or type(exc).__name__ == "PanicException"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, KeyError):
        # str(KeyError) is just the quoted key, which reads as noise in a decision.
        return _truncate(f"no such key: {exc.args[0] if exc.args else ''}")
    return _truncate(str(exc) or type(exc).__name__)


def _truncate(text: str) -> str:
    return text if len(text) <= _MAX_ERROR_TEXT else text[: _MAX_ERROR_TEXT - 3] + "..."
