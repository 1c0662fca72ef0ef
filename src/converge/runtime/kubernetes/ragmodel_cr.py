"""Read a `converge.dev/v1alpha1` `RAGModel` object that a person applied (pure, no I/O).

The CRD is `deploy/crds/ragmodels.converge.dev.yaml`. `parse_ragmodel` checks an object again
against the same rules the CRD states (an object may come from an older CRD, from a cluster
whose admission was bypassed, or from a test) and returns a typed `RAGModelSpec`, or `Refused`
with every reason a person has to fix. `refused_condition` is the `Accepted=False` condition
that tells them, in the object's `status.conditions`. Turning a spec into the desired state the
RAG API writes, and admission, come with the RAG models API, not here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from converge.runtime.kubernetes.model_cr import GROUP

API_VERSION = f"{GROUP}/v1alpha1"
KIND = "RAGModel"
PLURAL = "ragmodels"

CONDITION_ACCEPTED = "Accepted"
REASON_INVALID = "InvalidSpec"

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
MAX_NAME = 63
MIN_KNOWLEDGE_BASES, MAX_KNOWLEDGE_BASES = 1, 8
MIN_K, MAX_K, DEFAULT_K = 1, 50, 5
MODES = ("vector", "keyword", "hybrid")
DEFAULT_MODE = "hybrid"
MAX_FILTERS = 16
MAX_FILTER_FIELD = 128
MAX_FILTER_VALUE = 1024
MAX_PROMPT_TEMPLATE = 16_384
MAX_MESSAGE = 32_768  # metav1.Condition's message limit

FilterValue = str | bool | int | float
_SPEC_FIELDS = frozenset({"chatDeployment", "knowledgeBases", "ruleset", "retrieval", "promptTemplate"})
_RETRIEVAL_FIELDS = frozenset({"k", "mode", "minScore", "filters"})


@dataclass(frozen=True, kw_only=True)
class Retrieval:
    k: int = DEFAULT_K
    mode: str = DEFAULT_MODE
    min_score: float | None = None  # None: no threshold
    filters: Mapping[str, FilterValue] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, kw_only=True)
class RAGModelSpec:
    """An accepted `RAGModel`: which chat deployment answers, from which knowledge bases, how."""

    namespace: str
    name: str
    generation: int
    chat_deployment: str
    knowledge_bases: tuple[str, ...]
    retrieval: Retrieval
    ruleset: str | None = None
    prompt_template: str | None = None


@dataclass(frozen=True)
class Refused:
    """Why the object cannot be accepted, one reason per problem, each naming its field."""

    reasons: tuple[str, ...]


def parse_ragmodel(obj: Mapping[str, Any]) -> RAGModelSpec | Refused:
    reasons: list[str] = []
    if obj.get("apiVersion") != API_VERSION or obj.get("kind") != KIND:
        reasons.append(f"not a {KIND} ({API_VERSION}): {obj.get('kind')!r} ({obj.get('apiVersion')!r})")
    meta = obj.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    name, namespace = meta.get("name"), meta.get("namespace")
    for what, value in (("metadata.name", name), ("metadata.namespace", namespace)):
        if not isinstance(value, str) or not value:
            reasons.append(f"{what} is required")
    generation = meta.get("generation", 0)
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        return Refused((*reasons, "spec is required (an object)"))
    _unknown(spec, _SPEC_FIELDS, path="spec", reasons=reasons)
    chat = _name(spec.get("chatDeployment"), "spec.chatDeployment", reasons=reasons, required=True)
    bases = _knowledge_bases(spec.get("knowledgeBases"), reasons)
    ruleset = _name(spec.get("ruleset"), "spec.ruleset", reasons=reasons, required=False)
    retrieval = _retrieval(spec.get("retrieval", {}), reasons)
    template = _template(spec.get("promptTemplate"), reasons)
    if reasons:
        return Refused(tuple(reasons))
    assert isinstance(name, str) and isinstance(namespace, str)
    assert chat is not None and retrieval is not None
    return RAGModelSpec(
        namespace=namespace,
        name=name,
        generation=generation if _is_int(generation) else 0,
        chat_deployment=chat,
        knowledge_bases=bases,
        retrieval=retrieval,
        ruleset=ruleset,
        prompt_template=template,
    )


def refused_condition(
    reasons: Sequence[str],
    *,
    generation: int,
    now: datetime,
    previous: Sequence[Mapping[str, Any]] = (),
    reason: str = REASON_INVALID,
) -> dict[str, Any]:
    """The `Accepted=False` condition (metav1.Condition's shape) saying why, for `status.conditions`.

    `previous` are the object's conditions as they are: `lastTransitionTime` moves only when the
    status does, as the API conventions ask, so a pass that refuses again rewrites nothing.
    """
    if not reasons:
        raise ValueError("a refusal needs at least one reason")
    message = "; ".join(reasons)
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - 1] + "…"
    since = _timestamp(now)
    for condition in previous:
        if condition.get("type") == CONDITION_ACCEPTED and condition.get("status") == "False":
            since = str(condition.get("lastTransitionTime") or since)
    return {
        "type": CONDITION_ACCEPTED,
        "status": "False",
        "observedGeneration": generation,
        "lastTransitionTime": since,
        "reason": reason,
        "message": message,
    }


def with_condition(
    conditions: Sequence[Mapping[str, Any]], condition: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """`conditions` with `condition` in place of the one of its type (a list-map keyed by type)."""
    kept = [dict(c) for c in conditions if c.get("type") != condition["type"]]
    return [*kept, dict(condition)]


# --- fields ----------------------------------------------------------------------------------


def _unknown(node: Mapping[str, Any], known: frozenset[str], *, path: str, reasons: list[str]) -> None:
    # The API server prunes unknown fields silently; refusing them here says what was ignored.
    for key in sorted(set(node) - known, key=str):
        reasons.append(f"{path}.{key}: unknown field; known: {', '.join(sorted(known))}")


def _name(value: Any, path: str, *, reasons: list[str], required: bool) -> str | None:
    if value is None:
        if required:
            reasons.append(f"{path} is required")
        return None
    if not isinstance(value, str) or len(value) > MAX_NAME or not DNS1123_LABEL.fullmatch(value):
        reasons.append(f"{path}: {value!r} is not a name (a-z, 0-9 and '-', 1-{MAX_NAME} characters)")
        return None
    return value


def _knowledge_bases(value: Any, reasons: list[str]) -> tuple[str, ...]:
    path = "spec.knowledgeBases"
    if value is None:
        reasons.append(f"{path} is required: {MIN_KNOWLEDGE_BASES} to {MAX_KNOWLEDGE_BASES} names")
        return ()
    if not isinstance(value, list) or not MIN_KNOWLEDGE_BASES <= len(value) <= MAX_KNOWLEDGE_BASES:
        count = len(value) if isinstance(value, list) else "not a list"
        reasons.append(f"{path}: {MIN_KNOWLEDGE_BASES} to {MAX_KNOWLEDGE_BASES} names, got {count}")
        return ()
    names = [_name(item, f"{path}[{i}]", reasons=reasons, required=True) for i, item in enumerate(value)]
    seen: set[str] = set()
    for n in names:
        if n is not None and n in seen:
            reasons.append(f"{path}: {n!r} is listed twice")
        seen.add(n or "")
    return tuple(n for n in names if n is not None)


def _retrieval(value: Any, reasons: list[str]) -> Retrieval | None:
    path, before = "spec.retrieval", len(reasons)
    if not isinstance(value, Mapping):
        reasons.append(f"{path}: must be an object")
        return None
    _unknown(value, _RETRIEVAL_FIELDS, path=path, reasons=reasons)
    k = value.get("k", DEFAULT_K)
    if not _is_int(k) or not MIN_K <= k <= MAX_K:
        reasons.append(f"{path}.k: a whole number from {MIN_K} to {MAX_K}, got {k!r}")
    mode = value.get("mode", DEFAULT_MODE)
    if mode not in MODES:
        reasons.append(f"{path}.mode: one of {', '.join(MODES)}, got {mode!r}")
    min_score = value.get("minScore")
    if min_score is not None and (
        not _is_number(min_score) or not math.isfinite(min_score) or not 0 <= min_score <= 1
    ):
        reasons.append(f"{path}.minScore: a number from 0 to 1, got {min_score!r}")
    filters = _filters(value.get("filters", {}), f"{path}.filters", reasons=reasons)
    if len(reasons) > before:
        return None
    return Retrieval(
        k=k,
        mode=mode,
        min_score=float(min_score) if min_score is not None else None,
        filters=MappingProxyType(filters),
    )


def _filters(value: Any, path: str, *, reasons: list[str]) -> dict[str, FilterValue]:
    """Equality on one metadata field each (`metadata @> {field: value}`), as the search API."""
    if not isinstance(value, Mapping):
        reasons.append(f"{path}: must be an object of field: value")
        return {}
    if len(value) > MAX_FILTERS:
        reasons.append(f"{path}: at most {MAX_FILTERS} fields, got {len(value)}")
    out: dict[str, FilterValue] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not 1 <= len(key) <= MAX_FILTER_FIELD:
            reasons.append(f"{path}: field names are 1 to {MAX_FILTER_FIELD} characters, got {key!r}")
        elif isinstance(item, str) and len(item) > MAX_FILTER_VALUE:
            reasons.append(f"{path}.{key}: at most {MAX_FILTER_VALUE} characters")
        elif isinstance(item, float) and not math.isfinite(item):
            reasons.append(f"{path}.{key}: not a finite number")
        elif not isinstance(item, str | bool | int | float):
            reasons.append(f"{path}.{key}: a string, number or boolean, got {type(item).__name__}")
        else:
            out[key] = item
    return out


def _template(value: Any, reasons: list[str]) -> str | None:
    path = "spec.promptTemplate"
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        reasons.append(f"{path}: a non-empty string when given")
        return None
    if len(value) > MAX_PROMPT_TEMPLATE:
        reasons.append(f"{path}: at most {MAX_PROMPT_TEMPLATE} characters, got {len(value)}")
        return None
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _timestamp(moment: datetime) -> str:
    if moment.tzinfo is None:
        raise ValueError(f"Timestamp {moment.isoformat()} has no time zone; pass an aware datetime")
    return moment.astimezone(UTC).replace(microsecond=0, tzinfo=None).isoformat() + "Z"
