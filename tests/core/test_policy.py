"""Tests for the pure policy engine: CEL rules over facts -> Decision."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from converge.core.policy import (
    DEFAULT_POLICIES,
    FACTS_DOC,
    Effect,
    InvalidRuleError,
    Outcome,
    PolicyEvaluationError,
    PolicySyntaxError,
    Rule,
    Scope,
    build_facts,
    compile_expression,
    dry_run,
    evaluate,
)

DEFAULTS = {rule.name: rule for rule in DEFAULT_POLICIES}


def rule(expression: str, *, effect: str = "deny", scope: str = "registration", **extra: Any) -> Rule:
    name = extra.pop("name", f"{effect}-rule")
    return Rule(
        name=name, expression=expression, message=f"{name} failed", effect=effect, scope=scope, **extra
    )


def clean_upload(**overrides: dict[str, Any]) -> dict[str, Any]:
    """Facts for an ordinary, acceptable upload from a registered source."""
    sections: dict[str, dict[str, Any]] = {
        "source": {"kind": "upload", "known": True},
        "scan": {"status": "clean"},
        "inspection": {"license": "apache-2.0"},
        "version": {"state": "pending"},
    }
    sections.update(overrides)
    return build_facts(**sections)


def outcome_of(rules: list[Rule] | tuple[Rule, ...], facts: dict[str, Any], name: str) -> Outcome:
    the_rule = DEFAULTS[name]
    decision = evaluate(rules, facts, scope=the_rule.scope)
    return next(o.outcome for o in decision.outcomes if o.rule == name)


# --- compiling -------------------------------------------------------------------------------


def test_syntax_error_reports_line_and_column() -> None:
    with pytest.raises(PolicySyntaxError) as caught:
        compile_expression("scan.status ==")
    assert (caught.value.line, caught.value.column) == (1, 15)
    assert "Syntax error" in caught.value.message
    assert "line 1, column 15" in str(caught.value)


def test_syntax_error_on_second_line_reports_that_line() -> None:
    with pytest.raises(PolicySyntaxError) as caught:
        compile_expression('scan.status != "unsafe" &&\n  source.kind ==== "s3"')
    # Points at the second "==", which starts at column 17 of line 2.
    assert (caught.value.line, caught.value.column) == (2, 17)


def test_compiled_programs_are_cached() -> None:
    assert compile_expression("source.known") is compile_expression("source.known")


def test_non_bool_result_is_an_evaluation_error() -> None:
    with pytest.raises(PolicyEvaluationError, match="expected bool"):
        compile_expression("approvals.count").evaluate(build_facts())


def test_missing_key_is_an_evaluation_error() -> None:
    with pytest.raises(PolicyEvaluationError, match="no such key: nope"):
        compile_expression("scan.nope == 1").evaluate(build_facts())


# --- default policies ------------------------------------------------------------------------


def test_every_default_policy_compiles_and_passes_a_clean_upload() -> None:
    for name, default in DEFAULTS.items():
        compile_expression(default.expression)
        facts = clean_upload(version={"state": "approved"}, request={"build_succeeded": True})
        expected = Outcome.FAIL if default.effect is Effect.APPROVE else Outcome.PASS
        assert outcome_of(DEFAULT_POLICIES, facts, name) is expected, name


@pytest.mark.parametrize(
    ("name", "facts", "expected"),
    [
        ("deny-unsafe-pickles", clean_upload(scan={"status": "unsafe"}), Outcome.FAIL),
        ("deny-unsafe-pickles", clean_upload(scan={"status": "not_applicable"}), Outcome.PASS),
        ("deny-unknown-sources", clean_upload(source={"kind": "s3", "known": False}), Outcome.FAIL),
        ("deny-unknown-sources", build_facts(), Outcome.FAIL),
        ("warn-missing-license", clean_upload(inspection={"license": ""}), Outcome.FAIL),
        ("warn-missing-license", clean_upload(inspection={}), Outcome.FAIL),
        ("auto-approve-builtin-catalogue", clean_upload(source={"kind": "builtin"}), Outcome.PASS),
        (
            "auto-approve-builtin-catalogue",
            clean_upload(source={"kind": "builtin"}, scan={"status": "not_applicable"}),
            Outcome.PASS,
        ),
        (
            "auto-approve-builtin-catalogue",
            clean_upload(source={"kind": "builtin"}, scan={"status": "unsafe"}),
            Outcome.FAIL,
        ),
        ("deployment-requires-approved", clean_upload(version={"state": "pending"}), Outcome.FAIL),
        ("deployment-requires-approved", clean_upload(version={"state": "approved"}), Outcome.PASS),
    ],
)
def test_default_policy_outcome(name: str, facts: dict[str, Any], expected: Outcome) -> None:
    assert outcome_of(DEFAULT_POLICIES, facts, name) is expected


def test_unsafe_artifact_is_denied_with_the_rule_message() -> None:
    decision = evaluate(DEFAULT_POLICIES, clean_upload(scan={"status": "unsafe"}), scope="registration")
    assert decision.allowed is False
    assert decision.reasons == ["artifact contains unsafe pickle code or could not be scanned"]
    assert [o.rule for o in decision.denials] == ["deny-unsafe-pickles"]


def test_builtin_catalogue_is_auto_approved_but_never_when_denied() -> None:
    builtin = {"kind": "builtin", "known": True}
    approved = evaluate(DEFAULT_POLICIES, clean_upload(source=builtin), scope="registration")
    assert approved.allowed and approved.approve
    unsafe = clean_upload(source=builtin, scan={"status": "unsafe"})
    assert evaluate(DEFAULT_POLICIES, unsafe, scope="registration").approve is False


def test_approve_is_false_without_a_passing_approve_rule() -> None:
    decision = evaluate(DEFAULT_POLICIES, clean_upload(), scope="registration")
    assert decision.allowed is True
    assert decision.approve is False


def test_approve_rule_at_deployment_scope_is_rejected() -> None:
    with pytest.raises(InvalidRuleError):
        rule("true", effect="approve", scope="deployment")


def test_unknown_effect_is_rejected() -> None:
    with pytest.raises(InvalidRuleError, match="effect must be one of"):
        rule("true", effect="block")


# --- engine semantics ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expression",
    [
        'approvals.count > "one"',  # int compared with string
        "approvals.count",  # non-bool result
        "approvals.nope == 1",  # missing key
        "undefined_fact == 1",  # undefined variable
        "scan.status ==",  # stored rule that no longer parses
    ],
)
def test_deny_rule_that_errors_fails_closed(expression: str) -> None:
    decision = evaluate([rule(expression)], build_facts(), scope="registration")
    [outcome] = decision.outcomes
    assert outcome.outcome is Outcome.ERROR
    assert outcome.message is not None and outcome.message.startswith("evaluation error: ")
    assert decision.allowed is False
    assert decision.reasons == [outcome.message]


def test_approve_rule_that_errors_does_not_approve_or_block() -> None:
    decision = evaluate([rule("approvals.count", effect="approve")], build_facts(), scope="registration")
    assert decision.outcomes[0].outcome is Outcome.ERROR
    assert (decision.allowed, decision.approve) == (True, False)


def test_failing_warn_rule_does_not_block() -> None:
    decision = evaluate([rule("false", effect="warn"), rule("true")], build_facts(), scope="registration")
    assert decision.allowed is True
    assert [o.rule for o in decision.warnings] == ["warn-rule"]
    assert decision.denials == [] and decision.reasons == []


def test_only_enabled_rules_of_the_scope_are_evaluated_in_order() -> None:
    rules = [
        rule("true", name="first"),
        rule("false", name="other-scope", scope="deployment"),
        rule("false", name="switched-off", enabled=False),
        rule("true", name="last", effect="warn"),
    ]
    decision = evaluate(rules, build_facts(), scope=Scope.REGISTRATION)
    assert [o.rule for o in decision.outcomes] == ["first", "last"]
    assert decision.allowed is True


def test_no_rules_allows_without_approving() -> None:
    decision = evaluate([], build_facts(), scope="approval")
    assert (decision.allowed, decision.approve, decision.outcomes) == (True, False, [])


def test_decision_is_json_serialisable() -> None:
    decision = evaluate(DEFAULT_POLICIES, clean_upload(scan={"status": "unsafe"}), scope="registration")
    data = json.loads(json.dumps(decision.to_dict()))
    assert data["allowed"] is False
    assert data["outcomes"][0] == {
        "rule": "deny-unsafe-pickles",
        "effect": "deny",
        "outcome": "fail",
        "message": "artifact contains unsafe pickle code or could not be scanned",
    }


def test_dry_run_evaluates_a_disabled_rule_against_each_facts() -> None:
    candidate = rule('source.kind == "hf"', enabled=False)
    decisions = dry_run(candidate, [build_facts(source={"kind": "hf"}), build_facts()])
    assert [d.allowed for d in decisions] == [True, False]


# --- facts -----------------------------------------------------------------------------------


def test_build_facts_fills_every_documented_key() -> None:
    facts = build_facts()
    for section, keys in FACTS_DOC.items():
        documented = set(keys) - {"*"}
        assert documented <= set(facts[section]), section
    assert facts["source"]["known"] is False
    assert facts["inspection"]["has_chat_template"] is False
    assert facts["model"]["tags"] == [] and facts["benchmarks"] == {}
    assert facts["scan"]["status"] is None


def test_build_facts_merges_values_and_keeps_unknown_keys() -> None:
    facts = build_facts(model={"name": "smollm2", "family": "llama"}, benchmarks={"tokens_per_s": 42.0})
    assert facts["model"]["name"] == "smollm2"
    assert facts["model"]["family"] == "llama"
    assert facts["model"]["tags"] == []
    assert facts["benchmarks"] == {"tokens_per_s": 42.0}


def test_build_facts_defaults_are_not_shared_between_calls() -> None:
    build_facts()["model"]["tags"].append("mutated")
    assert build_facts()["model"]["tags"] == []


def test_expressions_can_compare_absent_facts_with_null() -> None:
    decision = evaluate(
        [rule("version.created_at == null && artifact.sha256 == null")], build_facts(), scope="registration"
    )
    assert decision.allowed is True


# --- property: evaluate never raises ---------------------------------------------------------

leaves = st.none() | st.booleans() | st.integers() | st.text(max_size=8) | st.floats()
values = leaves | st.lists(leaves, max_size=3) | st.dictionaries(st.text(max_size=5), leaves, max_size=3)
section_keys = {section: sorted(set(keys) - {"*"}) + ["extra"] for section, keys in FACTS_DOC.items()}
facts_strategy = st.fixed_dictionaries(
    {
        section: leaves | st.dictionaries(st.sampled_from(keys), values, max_size=len(keys))
        for section, keys in section_keys.items()
    }
)
EXTRA_RULES = [
    rule("approvals.count >= approvals.required", name="count"),
    rule('model.tags.exists(t, t == "prod")', name="tags", effect="warn"),
    rule("has(benchmarks.ttft_ms) && benchmarks.ttft_ms < 500", name="ttft", effect="approve"),
]


@settings(max_examples=300, deadline=None)
@given(facts=facts_strategy, scope=st.sampled_from(list(Scope)))
def test_evaluate_never_raises_and_reports_every_rule(facts: dict[str, Any], scope: Scope) -> None:
    rules = [*DEFAULT_POLICIES, *EXTRA_RULES]
    decision = evaluate(rules, facts, scope=scope)
    assert [o.rule for o in decision.outcomes] == [r.name for r in rules if r.scope is scope]
    deny_failed = any(o.outcome is not Outcome.PASS for o in decision.outcomes if o.effect is Effect.DENY)
    assert decision.allowed is not deny_failed
    json.dumps(decision.to_dict())
