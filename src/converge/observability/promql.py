"""Just enough PromQL reading to keep dashboards and rules in step with `/metrics`: the metric
names an expression selects, its selectors, and Grafana's variables filled in so Prometheus can
run it. Not a parser: string literals, label matchers, ranges and grouping clauses are masked
(kept at their length, so positions still match the expression) and what is left is read."""

from __future__ import annotations

import re
from dataclasses import dataclass

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_MODIFIER = re.compile(r"\b(?:offset\s+-?|@\s*)[\w.$()]+")
# An identifier not glued to a number, a variable or another name (1e3, $job, a:b).
_NAME = re.compile(r"(?<![\w.:$])[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless"}
    | {"offset", "inf", "nan"}
)
_GRAFANA_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


@dataclass(frozen=True, slots=True)
class Selector:
    name: str
    text: str  # the name with its label matchers, as written: `up{job="converge"}`


def _mask(pattern: re.Pattern[str], text: str, *, keep_ends: bool = False) -> str:
    def blank(match: re.Match[str]) -> str:
        found = match.group()
        return found[0] + " " * (len(found) - 2) + found[-1] if keep_ends else " " * len(found)

    return pattern.sub(blank, text)


def selectors(expr: str) -> list[Selector]:
    """The vector selectors of `expr`, in order (functions, keywords, labels, durations and
    Grafana variables are not selectors)."""
    quoted = _mask(_STRING, expr, keep_ends=True)  # no brace or bracket inside a string is seen
    braces = _mask(_MATCHERS, quoted, keep_ends=True)
    text = _mask(_MODIFIER, _mask(_GROUPING, _mask(_RANGE, braces)))
    found = []
    for match in _NAME.finditer(text):
        name, rest = match.group(), text[match.end() :]
        if name.lower() in _KEYWORDS or rest.lstrip().startswith("("):
            continue  # a keyword, or a function or aggregation called
        end = match.end()
        gap = len(rest) - len(rest.lstrip())
        if rest.lstrip().startswith("{"):
            end += gap + braces[end + gap :].index("}") + 1
        found.append(Selector(name=name, text=expr[match.start() : end]))
    return found


def metric_names(expr: str) -> set[str]:
    """The metric names `expr` selects (recording-rule names included)."""
    return {s.name for s in selectors(expr)}


def fill_variables(expr: str, values: dict[str, str]) -> str:
    """`expr` with Grafana's `$name` / `${name}` replaced from `values` (a KeyError names one
    that is missing)."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"no value for the variable ${name} in {expr!r}")
        return values[name]

    return _GRAFANA_VARIABLE.sub(value, expr)
