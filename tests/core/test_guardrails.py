"""Rulesets as the gateway applies them: validation, terms and patterns, redaction (Luhn-checked
cards), the streaming redactor over any split of the text, the token cap."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from converge.core import guardrails
from converge.core.guardrails import InvalidSpec, StreamRedactor, compile_spec, redact

ALL = ("email", "phone", "card")


def ruleset(**spec: object) -> guardrails.Compiled:
    return compile_spec(spec, id_="r1", name="house", version=3)


def test_terms_match_case_insensitively_on_word_boundaries() -> None:
    side = ruleset(input={"blocked_terms": ["Zeus", "secret plan"]}).input
    assert side.blocked("tell me about ZEUS, please") == "term:Zeus"
    assert side.blocked("the Secret  plan") is None  # two spaces: not the term
    assert side.blocked("the secret plan.") == "term:secret plan"
    assert side.blocked("zeusian architecture") is None
    assert side.blocked("") is None


def test_patterns_are_named_and_bare_strings_numbered() -> None:
    side = ruleset(input={"patterns": [{"name": "ticket", "regex": r"T-\d{4}"}, r"\bdrop\s+table\b"]}).input
    assert side.blocked("see T-1234") == "pattern:ticket"
    assert side.blocked("DROP TABLE x") is None  # patterns are case-sensitive unless they say (?i)
    assert side.blocked("drop  table x") == "pattern:pattern-2"


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"input": {"patterns": ["(unclosed"]}}, "input.patterns[0].regex"),
        ({"output": {"patterns": [{"name": "x", "regex": "(a+)+$"}]}}, "output.patterns[0].regex"),
        ({"input": {"patterns": [{"name": "bad name!", "regex": "a"}]}}, "input.patterns[0].name"),
        ({"input": {"patterns": ["a" * (guardrails.MAX_PATTERN + 1)]}}, "input.patterns[0].regex"),
        ({"input": {"redact": ["ssn"]}}, "input.redact[0]"),
        ({"output": {"max_tokens": 0}}, "output.max_tokens"),
        ({"input": {"max_tokens": 5}}, "input.max_tokens"),
        ({"input": {"blocked_terms": ["  "]}}, "input.blocked_terms[0]"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_invalid_specs_name_the_field(spec: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidSpec) as info:
        compile_spec(spec, id_=1, name="x", version=1)
    assert info.value.field == field


def test_normalize_fills_every_field() -> None:
    assert guardrails.normalize({}) == {
        "system": "",
        "input": {"blocked_terms": [], "patterns": [], "redact": []},
        "output": {"blocked_terms": [], "patterns": [], "redact": [], "max_tokens": None},
    }


def test_cards_are_luhn_checked() -> None:
    text, kinds = redact("pay with 4111 1111 1111 1111 or 4111-1111-1111-1112 or 1234567812345678", ALL)
    assert text == "pay with [REDACTED:card] or 4111-1111-1111-1112 or 1234567812345678"
    assert kinds == ["card"]
    assert guardrails.luhn("79927398713") and not guardrails.luhn("79927398710")


def test_emails_and_phones_are_redacted_but_dates_and_amounts_are_kept() -> None:
    text, kinds = redact("mail ann.lee+x@mail.example.org, call +44 20 7946 0958 or (415) 555-0100", ALL)
    assert text == "mail [REDACTED:email], call [REDACTED:phone] or [REDACTED:phone]"
    assert sorted(kinds) == ["email", "phone"]
    kept = "on 2024-01-15 we paid 1,250.00 for order 88412"
    assert redact(kept, ALL) == (kept, [])


def test_only_the_listed_kinds_are_redacted() -> None:
    assert redact("bob@example.com 4111111111111111", ["email"]) == (
        "[REDACTED:email] 4111111111111111",
        ["email"],
    )


TEXTS = st.sampled_from(
    [
        "Write to bob.smith@example.com today.",
        "Card: 4111 1111 1111 1111, thanks",
        "Call +1 415 555 0100 or mail a@b.io",
        "Nothing to see here, just 1234567812345678 and 2024-01-15.",
        "x@y.co",
    ]
)


@settings(max_examples=200, deadline=None)
@given(text=TEXTS, cuts=st.lists(st.integers(min_value=0, max_value=60), max_size=6))
def test_a_stream_cut_anywhere_is_redacted_like_the_whole_text(text: str, cuts: list[int]) -> None:
    side = ruleset(output={"redact": list(ALL)}).output
    points = sorted({min(c, len(text)) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]
    redactor = StreamRedactor(side)
    streamed = "".join(redactor.feed(p) for p in pieces) + redactor.flush()
    assert streamed == redact(text, ALL)[0]
    assert sorted(redactor.found) == sorted(redact(text, ALL)[1])


def test_the_redactor_holds_back_only_what_could_still_become_a_value() -> None:
    redactor = StreamRedactor(ruleset(output={"redact": ["email"]}).output)
    assert redactor.feed("Hello there, wri") == "Hello there, "
    assert redactor.feed("te to bob@exa") == "write to "
    assert redactor.feed("mple.com now") == "[REDACTED:email] "
    assert redactor.flush() == "now"


def test_a_blocked_term_split_across_chunks_stops_the_stream() -> None:
    redactor = StreamRedactor(ruleset(output={"blocked_terms": ["secret plan"]}).output)
    sent = redactor.feed("Our secr") + redactor.feed("et plan is")
    assert redactor.refused == "term:secret plan"
    assert "secr" not in sent
    assert redactor.feed(" more") == "" and redactor.flush() == ""


def test_input_messages_are_checked_only_where_the_user_speaks() -> None:
    side = ruleset(input={"blocked_terms": ["zeus"], "redact": ["email"]}).input
    messages = [
        {"role": "system", "content": "zeus is fine here"},
        {"role": "user", "content": [{"type": "text", "text": "mail me at a@b.io"}]},
    ]
    checked = guardrails.check_messages(side, messages)
    assert checked.refused is None and checked.redacted == ["email"]
    assert messages[1]["content"][0]["text"] == "mail me at [REDACTED:email]"
    refused = guardrails.check_messages(side, [{"role": "user", "content": "About Zeus"}])
    assert refused.refused == "term:zeus"


def test_the_token_cap_is_the_smaller_of_request_and_ruleset() -> None:
    assert guardrails.token_cap(None, 64) == 64
    assert guardrails.token_cap(32, 64) == 32
    assert guardrails.token_cap(128, 64) == 64
    assert guardrails.token_cap(128, None) == 128
