"""Pure policy engine: CEL rules over model facts -> a Decision with reasons.

No I/O happens here; callers load rules and gather facts, then call ``evaluate``.
See ``facts`` for the FACTS every expression can read.
"""

from converge.core.policy.engine import Decision, Outcome, RuleOutcome, dry_run, evaluate
from converge.core.policy.expressions import (
    CompiledExpression,
    PolicyError,
    PolicyEvaluationError,
    PolicySyntaxError,
    compile_expression,
)
from converge.core.policy.facts import FACTS_DOC, ModelLike, VersionLike, build_facts, version_facts
from converge.core.policy.rules import DEFAULT_POLICIES, Effect, InvalidRuleError, Rule, Scope

__all__ = [
    "DEFAULT_POLICIES",
    "FACTS_DOC",
    "CompiledExpression",
    "Decision",
    "Effect",
    "InvalidRuleError",
    "ModelLike",
    "Outcome",
    "PolicyError",
    "PolicyEvaluationError",
    "PolicySyntaxError",
    "Rule",
    "RuleOutcome",
    "VersionLike",
    "Scope",
    "build_facts",
    "compile_expression",
    "dry_run",
    "evaluate",
    "version_facts",
]
