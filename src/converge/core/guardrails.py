"""Rulesets as the gateway applies them: system instructions, blocked terms and patterns,
redaction of e-mail addresses, phone numbers and payment-card numbers, an output token cap.

Pure: no I/O. `compile_spec` validates a spec (the API's 422s name the field it reports) and
returns a `Compiled` ruleset; the gateway keeps one per ruleset version in its snapshot.

A spec::

    {"system": "You are ...",
     "input":  {"blocked_terms": ["zeus"], "patterns": [{"name": "ticket", "regex": "T-\\d+"}],
                "redact": ["email", "phone", "card"]},
     "output": {"blocked_terms": [], "patterns": [], "redact": ["email"], "max_tokens": 256}}

Terms match case-insensitively on word boundaries ("Zeus!" matches "zeus", "zeusian" does not).
Patterns are Python regular expressions, at most `MAX_PATTERN` characters, refused when they do
not compile or nest repetitions (`(a+)+`, the shape that backtracks for exponential time).
Rules are named `term:<term>` and `pattern:<name>` (a pattern given as a bare string is named
`pattern-<n>`, from 1), redactions `redact:<kind>`: the names refusals, hits and metrics carry.
Card numbers are 13-19 digits (spaces or dashes between) that pass the Luhn check: any other
long number is kept.
"""

from __future__ import annotations

import re
import re._constants as sre_constants  # type: ignore[import-not-found]  # no stubs; stable since 3.11
import re._parser as sre_parse  # type: ignore[import-not-found]
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

REDACTABLE = ("email", "phone", "card")
MAX_PATTERN = 512
MAX_RULES = 200  # terms plus patterns, per side
MAX_TERM = 200
MAX_SYSTEM = 16_000
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
Where = Literal["input", "output"]

EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})*\.[A-Za-z]{2,24}"
)
CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d])")
PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){1,4}(?!\w)")
SHORT_PHONE = re.compile(r"^\d{3}[ .-]\d{4}$")
# Streaming: the tail that could still grow into a value, and the most of it worth holding.
EMAIL_TAIL = re.compile(r"[A-Za-z0-9._%+@-]+$")
NUMBER_TAIL = re.compile(r"[+(]?\d[\d ().+-]*$")
MAX_EMAIL_HOLD, MAX_NUMBER_HOLD = 254, 40


class InvalidSpec(ValueError):
    """A spec the API refuses; `field` is its dotted path (`output.patterns[1].regex`)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


@dataclass(frozen=True, slots=True)
class Rule:
    name: str  # term:<term> | pattern:<name>
    regex: re.Pattern[str]


@dataclass(frozen=True, slots=True)
class Side:
    """The guardrails of one direction (input or output)."""

    rules: tuple[Rule, ...] = ()
    redact: tuple[str, ...] = ()
    terms: re.Pattern[str] | None = None  # every term in one alternation
    term_names: dict[str, str] = field(default_factory=dict)  # casefolded term -> rule name
    longest_term: int = 0

    @property
    def active(self) -> bool:
        return bool(self.terms or self.rules or self.redact)

    def blocked(self, text: str) -> str | None:
        """The name of the first rule the text breaks, or None."""
        if self.terms is not None and (found := self.terms.search(text)) is not None:
            return self.term_names.get(found.group().casefold(), "term")
        for rule in self.rules:
            if rule.regex.search(text) is not None:
                return rule.name
        return None

    def redacted(self, text: str) -> tuple[str, list[str]]:
        """The text with every value of the redacted kinds replaced; the kinds that were found."""
        return redact(text, self.redact)


@dataclass(frozen=True, slots=True)
class Compiled:
    """One version of a ruleset, ready to apply."""

    id: Any  # the ruleset's id (a UUID in the gateway; anything in tests)
    name: str
    version: int
    system: str = ""
    input: Side = Side()
    output: Side = Side()
    max_tokens: int | None = None

    @property
    def ref(self) -> dict[str, Any]:
        return {"id": str(self.id), "name": self.name, "version": self.version}

    def hit(self, rule: str, *, action: str, where: Where) -> dict[str, Any]:
        return {
            "ruleset": self.name,
            "ruleset_id": str(self.id),
            "version": self.version,
            "rule": rule,
            "action": action,
            "where": where,
        }


# -- compiling ------------------------------------------------------------------------------------


def normalize(spec: Any) -> dict[str, Any]:
    """The spec with every field present (the form that is stored), or InvalidSpec."""
    if not isinstance(spec, dict):
        raise InvalidSpec("spec", "must be an object with system, input and output")
    unknown = set(spec) - {"system", "input", "output"}
    if unknown:
        raise InvalidSpec(sorted(unknown)[0], "unknown field (a spec has system, input and output)")
    system = spec.get("system") or ""
    if not isinstance(system, str) or len(system) > MAX_SYSTEM:
        raise InvalidSpec("system", f"must be text of at most {MAX_SYSTEM} characters")
    out: dict[str, Any] = {"system": system}
    for where in ("input", "output"):
        out[where] = _side_spec(spec.get(where) or {}, where)
    return out


def _side_spec(data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise InvalidSpec(where, "must be an object")
    allowed = {"blocked_terms", "patterns", "redact"} | ({"max_tokens"} if where == "output" else set())
    unknown = set(data) - allowed
    if unknown:
        raise InvalidSpec(
            f"{where}.{sorted(unknown)[0]}", f"unknown field (allowed: {', '.join(sorted(allowed))})"
        )
    terms = _list(data.get("blocked_terms"), f"{where}.blocked_terms")
    for i, term in enumerate(terms):
        if not isinstance(term, str) or not term.strip() or len(term) > MAX_TERM:
            raise InvalidSpec(
                f"{where}.blocked_terms[{i}]", f"must be non-empty text of at most {MAX_TERM} characters"
            )
    patterns = []
    for i, item in enumerate(_list(data.get("patterns"), f"{where}.patterns")):
        patterns.append(_pattern(item, where=f"{where}.patterns[{i}]", index=i))
    if len(terms) + len(patterns) > MAX_RULES:
        raise InvalidSpec(where, f"at most {MAX_RULES} terms and patterns")
    redact_kinds = _list(data.get("redact"), f"{where}.redact")
    for i, kind in enumerate(redact_kinds):
        if kind not in REDACTABLE:
            raise InvalidSpec(f"{where}.redact[{i}]", f"must be one of {', '.join(REDACTABLE)}")
    side: dict[str, Any] = {
        "blocked_terms": [t.strip() for t in terms],
        "patterns": patterns,
        "redact": list(dict.fromkeys(redact_kinds)),
    }
    if where == "output":
        cap = data.get("max_tokens")
        if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
            raise InvalidSpec("output.max_tokens", "must be a positive integer or null")
        side["max_tokens"] = cap
    return side


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidSpec(where, "must be a list")
    return value


def _pattern(item: Any, *, where: str, index: int) -> dict[str, str]:
    if isinstance(item, str):
        item = {"name": f"pattern-{index + 1}", "regex": item}
    if not isinstance(item, dict) or set(item) - {"name", "regex"} or not isinstance(item.get("regex"), str):
        raise InvalidSpec(where, "must be a regular expression, or {name, regex}")
    name = item.get("name") or f"pattern-{index + 1}"
    if not isinstance(name, str) or not NAME.match(name):
        raise InvalidSpec(f"{where}.name", "must be 1-63 letters, digits, '.', '_' or '-'")
    regex = item["regex"]
    if not regex or len(regex) > MAX_PATTERN:
        raise InvalidSpec(f"{where}.regex", f"must be 1-{MAX_PATTERN} characters")
    try:
        parsed = sre_parse.parse(regex)
        re.compile(regex)
    except re.error as exc:
        raise InvalidSpec(f"{where}.regex", f"does not compile: {exc}") from None
    if _nested_repeat(parsed.data, inside=False):
        raise InvalidSpec(
            f"{where}.regex", "nests repetitions (like (a+)+), which can take exponential time; rewrite it"
        )
    return {"name": name, "regex": regex}


_REPEATS = (sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT, sre_constants.POSSESSIVE_REPEAT)


def _nested_repeat(items: Iterable[Any], *, inside: bool) -> bool:
    for op, arg in items:
        if op in _REPEATS:
            _, high, sub = arg
            unbounded = high == sre_constants.MAXREPEAT or high > 1
            if inside and unbounded:
                return True
            if _nested_repeat(sub, inside=inside or unbounded):
                return True
        elif op is sre_constants.SUBPATTERN:
            if _nested_repeat(arg[-1], inside=inside):
                return True
        elif op is sre_constants.BRANCH:
            if any(_nested_repeat(branch, inside=inside) for branch in arg[1]):
                return True
        elif op in (sre_constants.ASSERT, sre_constants.ASSERT_NOT):
            if _nested_repeat(arg[1], inside=inside):
                return True
    return False


def compile_spec(spec: Any, *, id_: Any, name: str, version: int) -> Compiled:
    """Validate and compile; InvalidSpec names the field that is wrong."""
    spec = normalize(spec)
    return Compiled(
        id=id_,
        name=name,
        version=version,
        system=spec["system"],
        input=_side(spec["input"]),
        output=_side(spec["output"]),
        max_tokens=spec["output"].get("max_tokens"),
    )


def _side(data: dict[str, Any]) -> Side:
    terms = data["blocked_terms"]
    alternation = None
    if terms:
        # Longest first, so "zeus project" wins over "zeus" where both match.
        ordered = sorted(terms, key=len, reverse=True)
        alternation = re.compile(
            r"(?<!\w)(?:" + "|".join(re.escape(t) for t in ordered) + r")(?!\w)", re.IGNORECASE
        )
    rules = tuple(Rule(f"pattern:{p['name']}", re.compile(p["regex"])) for p in data["patterns"])
    return Side(
        rules=rules,
        redact=tuple(data["redact"]),
        terms=alternation,
        term_names={t.casefold(): f"term:{t}" for t in terms},
        longest_term=max((len(t) for t in terms), default=0),
    )


# -- redaction ------------------------------------------------------------------------------------


def luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _digits(text: str) -> str:
    return "".join(ch for ch in text if ch.isdigit())


def _is_card(value: str) -> bool:
    digits = _digits(value)
    return 13 <= len(digits) <= 19 and luhn(digits)


def _is_phone(value: str) -> bool:
    digits = _digits(value)
    if not 7 <= len(digits) <= 15:
        return False
    if value[0] in "+(":
        return len(digits) >= 8
    # Without a country code or area-code parentheses: ten digits or more (dates, amounts and
    # ids have fewer), or the 555-0123 form.
    return len(digits) >= 10 or SHORT_PHONE.match(value) is not None


def redact(text: str, kinds: Iterable[str]) -> tuple[str, list[str]]:
    """Replace every value of the kinds with `[REDACTED:<kind>]`; the kinds that were found.

    Cards go first (a card number is also a run of digits a phone pattern would take)."""
    found: list[str] = []
    kinds = tuple(kinds)
    for kind, regex, check in (("card", CARD, _is_card), ("phone", PHONE, _is_phone), ("email", EMAIL, None)):
        if kind not in kinds:
            continue
        hit = False

        def replace(match: re.Match[str], *, kind: str = kind, check: Any = check) -> str:
            nonlocal hit
            if check is not None and not check(match.group()):
                return match.group()
            hit = True
            return f"[REDACTED:{kind}]"

        text = regex.sub(replace, text)
        if hit:
            found.append(kind)
    return text, found


def _hold(text: str, kinds: tuple[str, ...]) -> int:
    """How many trailing characters could still become (part of) a value once more text comes."""
    hold = 0
    if "email" in kinds and (m := EMAIL_TAIL.search(text)) is not None:
        hold = min(len(m.group()), MAX_EMAIL_HOLD)
    if ("card" in kinds or "phone" in kinds) and (m := NUMBER_TAIL.search(text)) is not None:
        hold = max(hold, min(len(m.group()), MAX_NUMBER_HOLD))
    return hold


class StreamRedactor:
    """Output guardrails over a stream of text pieces.

    `feed` returns what may be sent now: the redacted text except a tail that could still grow
    into an e-mail address, phone number or card number (at most the current word, or the
    trailing run of digits and separators), so a value split across chunks is still found.
    `flush` returns the rest at the end. A blocked term or pattern sets `refused` (its rule
    name) and nothing more is returned; it is checked over the text not yet sent plus the last
    `lookbehind` characters sent, so a term split across chunks is still found.
    """

    __slots__ = ("side", "pending", "sent_tail", "refused", "found", "lookbehind")

    def __init__(self, side: Side, *, lookbehind: int = 256) -> None:
        self.side = side
        self.pending = ""
        self.sent_tail = ""
        self.refused: str | None = None
        self.found: list[str] = []  # redacted kinds, in order of first hit
        self.lookbehind = lookbehind

    def feed(self, piece: str) -> str:
        if self.refused is not None:
            return ""
        text = self.pending + piece
        side = self.side
        if (side.terms is not None or side.rules) and (rule := side.blocked(self.sent_tail + text)):
            self.refused, self.pending = rule, ""
            return ""
        # A term split across chunks must not go out in halves: hold back one character less
        # than the longest term, besides what could still become a value to redact.
        hold = max(_hold(text, side.redact), side.longest_term - 1, 0)
        cut = max(0, len(text) - hold)
        for kind, regex in (("email", EMAIL), ("card", CARD), ("phone", PHONE)):
            if kind in side.redact:  # never cut through a value already there
                for m in regex.finditer(text):
                    if m.start() < cut < m.end():
                        cut = m.start()
        ready, self.pending = text[:cut], text[cut:]
        return self._sent(self._redact(ready))

    def flush(self) -> str:
        if self.refused is not None:
            return ""
        text, self.pending = self.pending, ""
        if text and (self.side.terms is not None or self.side.rules):
            if rule := self.side.blocked(self.sent_tail + text):
                self.refused = rule
                return ""
        return self._sent(self._redact(text))

    def _redact(self, text: str) -> str:
        if not text:
            return text
        text, kinds = redact(text, self.side.redact)
        for kind in kinds:
            if kind not in self.found:
                self.found.append(kind)
        return text

    def _sent(self, text: str) -> str:
        if text:
            self.sent_tail = (self.sent_tail + text)[-self.lookbehind :]
        return text


# -- messages -------------------------------------------------------------------------------------


@dataclass(slots=True)
class Checked:
    """The outcome of input guardrails: the refused rule, or the (possibly redacted) messages."""

    refused: str | None = None
    redacted: list[str] = field(default_factory=list)  # kinds found


def check_messages(side: Side, messages: list[Any]) -> Checked:
    """Input guardrails over the user messages of a chat body, redacting them in place.

    Only `user` messages are the caller's input: system messages are the caller's own
    instructions, assistant messages were output (checked then), tool results come from tools."""
    out = Checked()
    for message in messages:
        if not isinstance(message, dict) or message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            message["content"] = _check_text(side, content, out=out)
        elif isinstance(content, list):
            for part in content:
                if (
                    isinstance(part, dict)
                    and part.get("type") == "text"
                    and isinstance(part.get("text"), str)
                ):
                    part["text"] = _check_text(side, part["text"], out=out)
        if out.refused is not None:
            return out
    return out


def check_prompt(side: Side, prompt: Any) -> tuple[Any, Checked]:
    """Input guardrails over a /v1/completions prompt (text or a list of texts)."""
    out = Checked()
    if isinstance(prompt, str):
        return _check_text(side, prompt, out=out), out
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        return [_check_text(side, p, out=out) for p in prompt], out
    return prompt, out


def _check_text(side: Side, text: str, *, out: Checked) -> str:
    if out.refused is not None:
        return text
    rule = side.blocked(text)
    if rule is not None:
        out.refused = rule
        return text
    if side.redact:
        text, kinds = side.redacted(text)
        out.redacted += [k for k in kinds if k not in out.redacted]
    return text


def token_cap(requested: int | None, cap: int | None) -> int | None:
    """The completion tokens a request may use: the smaller of what it asked and the cap."""
    if cap is None:
        return requested
    return cap if requested is None else min(requested, cap)
