"""The `RAGModel` CRD and its parser: the CRD is valid Kubernetes, objects it admits parse (and
the ones it refuses are refused by the parser too, with a reason naming the field), and a refused
object's condition fits the CRD's status schema."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from converge.runtime.kubernetes import ragmodel_cr
from converge.runtime.kubernetes.ragmodel_cr import (
    RAGModelSpec,
    Refused,
    Retrieval,
    parse_ragmodel,
    refused_condition,
    with_condition,
)

CRD_PATH = Path(__file__).resolve().parents[3] / "deploy" / "crds" / "ragmodels.converge.dev.yaml"
NOW = datetime(2026, 12, 2, 9, 15, 30, 250000, tzinfo=UTC)


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text(encoding="utf-8"))


def _version(crd: dict[str, Any]) -> dict[str, Any]:
    (only,) = crd["spec"]["versions"]
    return only


def _closed(node: Any) -> Any:
    """No field Kubernetes would silently prune: unknown fields fail here instead. A `set` list
    refuses duplicates, as the API server does."""
    if isinstance(node, dict):
        if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node.setdefault("additionalProperties", False)
        if node.get("x-kubernetes-list-type") == "set":
            node["uniqueItems"] = True
        for value in node.values():
            _closed(value)
    elif isinstance(node, list):
        for value in node:
            _closed(value)
    return node


@pytest.fixture(scope="module")
def validator(crd: dict[str, Any]) -> jsonschema.Draft202012Validator:
    schema = _closed(copy.deepcopy(_version(crd)["schema"]["openAPIV3Schema"]))
    return jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


def _errors(validator: jsonschema.Draft202012Validator, obj: dict[str, Any]) -> list[str]:
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
    return [f"{list(e.absolute_path)}: {e.message}" for e in errors]


def support_bot(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "chatDeployment": "chat",
        "knowledgeBases": ["handbook", "faq"],
        "ruleset": "no-pii",
        "retrieval": {"k": 8, "mode": "hybrid", "minScore": 0.25, "filters": {"lang": "en", "public": True}},
        "promptTemplate": "Answer from the passages.\n\n{context}\n\nQuestion: {question}",
    }
    return {
        "apiVersion": "converge.dev/v1alpha1",
        "kind": "RAGModel",
        "metadata": {"name": "support-bot", "namespace": "converge-team-a", "generation": 3},
        "spec": {**base, **spec},
    }


def _without(obj: dict[str, Any], *path: str) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    node = out
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return out


# --- the CRD -----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.29", "1.31", "1.33"])
def test_crd_is_a_valid_kubernetes_object(crd: dict[str, Any], version: str) -> None:
    assert kubernetes_validate.validate(crd, version, strict=True) == version


def test_crd_declares_the_kind_the_parser_reads(crd: dict[str, Any]) -> None:
    spec = crd["spec"]
    assert crd["metadata"]["name"] == f"{ragmodel_cr.PLURAL}.converge.dev"
    names = spec["names"]
    assert (spec["group"], names["kind"], names["plural"]) == ("converge.dev", "RAGModel", "ragmodels")
    assert spec["scope"] == "Namespaced"
    version = _version(crd)
    assert f"{spec['group']}/{version['name']}" == ragmodel_cr.API_VERSION
    assert version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}


def test_crd_schema_is_structural(crd: dict[str, Any]) -> None:
    """Every node states its type (or says it keeps what it is given), as apiextensions/v1 asks."""
    untyped: list[str] = []

    def walk(node: dict[str, Any], path: str) -> None:
        if "type" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            untyped.append(path or "<root>")
        for name, child in node.get("properties", {}).items():
            walk(child, f"{path}.{name}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                walk(node[key], f"{path}[{key}]")

    walk(_version(crd)["schema"]["openAPIV3Schema"], "")
    assert untyped == []


def test_crd_limits_are_the_parsers(crd: dict[str, Any]) -> None:
    spec = _version(crd)["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    bases, retrieval = spec["knowledgeBases"], spec["retrieval"]["properties"]
    assert (bases["minItems"], bases["maxItems"]) == (
        ragmodel_cr.MIN_KNOWLEDGE_BASES,
        ragmodel_cr.MAX_KNOWLEDGE_BASES,
    )
    assert (retrieval["k"]["minimum"], retrieval["k"]["maximum"]) == (ragmodel_cr.MIN_K, ragmodel_cr.MAX_K)
    assert retrieval["k"]["default"] == ragmodel_cr.DEFAULT_K == Retrieval().k
    assert tuple(retrieval["mode"]["enum"]) == ragmodel_cr.MODES
    assert retrieval["mode"]["default"] == ragmodel_cr.DEFAULT_MODE == Retrieval().mode
    assert (retrieval["minScore"]["minimum"], retrieval["minScore"]["maximum"]) == (0, 1)
    assert retrieval["filters"]["maxProperties"] == ragmodel_cr.MAX_FILTERS
    assert spec["promptTemplate"]["maxLength"] == ragmodel_cr.MAX_PROMPT_TEMPLATE
    for name in (spec["chatDeployment"], bases["items"], spec["ruleset"]):
        assert (
            name["pattern"] == ragmodel_cr.DNS1123_LABEL.pattern and name["maxLength"] == ragmodel_cr.MAX_NAME
        )
    required = _version(crd)["schema"]["openAPIV3Schema"]["properties"]["spec"]["required"]
    assert sorted(required) == ["chatDeployment", "knowledgeBases"]


def test_printer_columns_point_at_fields_of_the_schema(crd: dict[str, Any]) -> None:
    version = _version(crd)
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert list(columns) == ["Chat", "Mode", "Accepted", "Reason", "Age"]
    schema = version["schema"]["openAPIV3Schema"]
    for path in columns.values():
        if path == ".metadata.creationTimestamp":
            continue
        node = schema
        for part in re.sub(r"\[\?\(@\.type==\"Accepted\"\)\]", "", path).strip(".").split("."):
            node = node["properties"][part]
            node = node.get("items", node)
        assert node["type"] == "string", path
    assert 'conditions[?(@.type=="Accepted")].status' in columns["Accepted"]


# --- good objects --------------------------------------------------------------------------


def test_a_full_object_fits_the_crd_and_parses_to_its_spec(
    validator: jsonschema.Draft202012Validator,
) -> None:
    obj = support_bot()
    assert _errors(validator, obj) == []

    parsed = parse_ragmodel(obj)

    assert parsed == RAGModelSpec(
        namespace="converge-team-a",
        name="support-bot",
        generation=3,
        chat_deployment="chat",
        knowledge_bases=("handbook", "faq"),
        ruleset="no-pii",
        retrieval=Retrieval(k=8, mode="hybrid", min_score=0.25, filters={"lang": "en", "public": True}),
        prompt_template="Answer from the passages.\n\n{context}\n\nQuestion: {question}",
    )


def test_the_smallest_object_gets_the_crds_defaults(validator: jsonschema.Draft202012Validator) -> None:
    obj = support_bot()
    obj["spec"] = {"chatDeployment": "chat", "knowledgeBases": ["handbook"]}
    assert _errors(validator, obj) == []

    parsed = parse_ragmodel(obj)

    assert isinstance(parsed, RAGModelSpec)
    assert parsed.retrieval == Retrieval(k=5, mode="hybrid", min_score=None, filters={})
    assert (parsed.ruleset, parsed.prompt_template) == (None, None)


def test_parsed_specs_are_immutable() -> None:
    parsed = parse_ragmodel(support_bot())
    assert isinstance(parsed, RAGModelSpec)
    with pytest.raises(AttributeError):
        parsed.chat_deployment = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        parsed.retrieval.filters["lang"] = "de"  # type: ignore[index]


@pytest.mark.parametrize(
    "spec",
    [
        {"knowledgeBases": [f"kb-{i}" for i in range(8)]},
        {"retrieval": {"k": 1, "mode": "vector", "minScore": 0}},
        {"retrieval": {"k": 50, "mode": "keyword", "minScore": 1}},
        {"retrieval": {"filters": {"year": 2026, "score": 0.5, "draft": False}}},
        {"promptTemplate": "x" * 16_384},
        {"chatDeployment": "a" * 63},
    ],
)
def test_objects_at_the_limits_are_accepted(
    validator: jsonschema.Draft202012Validator, spec: dict[str, Any]
) -> None:
    obj = support_bot(**spec)
    assert _errors(validator, obj) == []
    assert isinstance(parse_ragmodel(obj), RAGModelSpec)


# --- refused objects -------------------------------------------------------------------------

# (change to the spec, the field the parser's reason names); the CRD refuses every one as well.
BAD_SPECS: list[tuple[dict[str, Any], str]] = [
    ({"chatDeployment": "Chat"}, "spec.chatDeployment"),
    ({"chatDeployment": "a" * 64}, "spec.chatDeployment"),
    ({"chatDeployment": ""}, "spec.chatDeployment"),
    ({"chatDeployment": 7}, "spec.chatDeployment"),
    ({"knowledgeBases": []}, "spec.knowledgeBases"),
    ({"knowledgeBases": [f"kb-{i}" for i in range(9)]}, "spec.knowledgeBases"),
    ({"knowledgeBases": "handbook"}, "spec.knowledgeBases"),
    ({"knowledgeBases": ["handbook", "hand_book"]}, "spec.knowledgeBases[1]"),
    ({"knowledgeBases": ["faq", "faq"]}, "'faq' is listed twice"),
    ({"ruleset": "-no-pii"}, "spec.ruleset"),
    ({"retrieval": {"k": 0}}, "spec.retrieval.k"),
    ({"retrieval": {"k": 51}}, "spec.retrieval.k"),
    ({"retrieval": {"k": 2.5}}, "spec.retrieval.k"),
    ({"retrieval": {"k": True}}, "spec.retrieval.k"),
    ({"retrieval": {"mode": "semantic"}}, "spec.retrieval.mode"),
    ({"retrieval": {"minScore": 1.5}}, "spec.retrieval.minScore"),
    ({"retrieval": {"minScore": -0.1}}, "spec.retrieval.minScore"),
    ({"retrieval": {"minScore": "0.5"}}, "spec.retrieval.minScore"),
    ({"retrieval": {"filters": {f"f{i}": i for i in range(17)}}}, "at most 16 fields"),
    ({"retrieval": {"filters": "lang=en"}}, "spec.retrieval.filters"),
    ({"retrieval": {"topK": 5}}, "spec.retrieval.topK: unknown field"),
    ({"retrieval": []}, "spec.retrieval: must be an object"),
    ({"promptTemplate": ""}, "spec.promptTemplate"),
    ({"promptTemplate": "x" * 16_385}, "spec.promptTemplate: at most 16384"),
    ({"temperature": 0.2}, "spec.temperature: unknown field"),
]


@pytest.mark.parametrize(("spec", "named"), BAD_SPECS)
def test_objects_the_crd_refuses_are_refused_with_the_field_named(
    validator: jsonschema.Draft202012Validator, spec: dict[str, Any], named: str
) -> None:
    obj = support_bot(**spec)
    assert _errors(validator, obj), "the CRD admits it"

    parsed = parse_ragmodel(obj)

    assert isinstance(parsed, Refused)
    assert any(named in reason for reason in parsed.reasons), parsed.reasons


@pytest.mark.parametrize("field", ["chatDeployment", "knowledgeBases"])
def test_required_fields_are_required(validator: jsonschema.Draft202012Validator, field: str) -> None:
    obj = _without(support_bot(), "spec", field)
    assert _errors(validator, obj)
    parsed = parse_ragmodel(obj)
    assert isinstance(parsed, Refused) and f"spec.{field} is required" in parsed.reasons[0]


def test_every_problem_is_reported_at_once() -> None:
    obj = support_bot(chatDeployment="Chat", knowledgeBases=[], retrieval={"k": 99, "mode": "fuzzy"})
    parsed = parse_ragmodel(obj)
    assert isinstance(parsed, Refused)
    fields = [reason.split(":")[0] for reason in parsed.reasons]
    assert fields == ["spec.chatDeployment", "spec.knowledgeBases", "spec.retrieval.k", "spec.retrieval.mode"]


@pytest.mark.parametrize(
    ("filters", "named"),
    [
        ({"tags": ["a", "b"]}, "spec.retrieval.filters.tags: a string, number or boolean, got list"),
        ({"owner": {"name": "x"}}, "got dict"),
        ({"owner": None}, "got NoneType"),
        ({"lang": "x" * 1025}, "at most 1024 characters"),
        ({"": "x"}, "field names are 1 to 128"),
        ({"f" * 129: "x"}, "field names are 1 to 128"),
        ({"score": float("nan")}, "not a finite number"),
    ],
)
def test_filter_values_are_scalars_the_search_can_match(filters: dict[str, Any], named: str) -> None:
    """The CRD keeps filter values as given (a schema cannot say "string or number or boolean"
    structurally), so the parser is where a list or an object is refused."""
    parsed = parse_ragmodel(support_bot(retrieval={"filters": filters}))
    assert isinstance(parsed, Refused)
    assert any(named in reason for reason in parsed.reasons), parsed.reasons


def test_a_blank_prompt_template_is_refused_though_the_crd_admits_it(
    validator: jsonschema.Draft202012Validator,
) -> None:
    obj = support_bot(promptTemplate="  \n ")
    assert _errors(validator, obj) == []
    parsed = parse_ragmodel(obj)
    assert isinstance(parsed, Refused) and "spec.promptTemplate" in parsed.reasons[0]


@pytest.mark.parametrize(
    ("obj", "named"),
    [
        ({"apiVersion": "converge.dev/v1", "kind": "RAGModel"}, "not a RAGModel"),
        ({"kind": "Model"}, "not a RAGModel"),
        ({"metadata": {"name": "support-bot"}}, "metadata.namespace is required"),
        ({"spec": None}, "spec is required"),
    ],
)
def test_objects_that_are_not_a_namespaced_ragmodel_are_refused(obj: dict[str, Any], named: str) -> None:
    parsed = parse_ragmodel({**support_bot(), **obj})
    assert isinstance(parsed, Refused)
    assert any(named in reason for reason in parsed.reasons), parsed.reasons


# --- the refused condition ---------------------------------------------------------------------


def test_a_refusal_is_an_accepted_false_condition_that_fits_the_status_schema(
    validator: jsonschema.Draft202012Validator,
) -> None:
    obj = support_bot(retrieval={"k": 99, "mode": "fuzzy"})
    parsed = parse_ragmodel(obj)
    assert isinstance(parsed, Refused)

    condition = refused_condition(parsed.reasons, generation=3, now=NOW)

    assert condition == {
        "type": "Accepted",
        "status": "False",
        "observedGeneration": 3,
        "lastTransitionTime": "2026-12-02T09:15:30Z",
        "reason": "InvalidSpec",
        "message": "; ".join(parsed.reasons),
    }
    fixed = support_bot()
    assert _errors(validator, {**fixed, "status": {"observedGeneration": 3, "conditions": [condition]}}) == []


def test_the_transition_time_moves_only_when_the_status_does() -> None:
    first = refused_condition(["spec.retrieval.k: too big"], generation=1, now=NOW)
    later = NOW + timedelta(minutes=5)

    again = refused_condition(["spec.retrieval.mode: unknown"], generation=2, now=later, previous=[first])
    after_accepted = refused_condition(
        ["spec.ruleset: bad"],
        generation=3,
        now=later,
        previous=[{**first, "status": "True", "reason": "Accepted"}],
    )

    assert again["lastTransitionTime"] == first["lastTransitionTime"]
    assert (again["observedGeneration"], again["message"]) == (2, "spec.retrieval.mode: unknown")
    assert after_accepted["lastTransitionTime"] == "2026-12-02T09:20:30Z"


def test_a_condition_replaces_the_one_of_its_type_and_keeps_the_others() -> None:
    ready = {
        "type": "Ready",
        "status": "False",
        "reason": "NotAccepted",
        "message": "",
        "lastTransitionTime": "x",
    }
    old = refused_condition(["a"], generation=1, now=NOW)
    new = refused_condition(["b"], generation=2, now=NOW)

    merged = with_condition([ready, old], new)

    assert merged == [ready, new]


def test_a_huge_refusal_is_cut_to_the_condition_message_limit(
    validator: jsonschema.Draft202012Validator,
) -> None:
    condition = refused_condition(["x" * 20_000, "y" * 20_000], generation=1, now=NOW)
    assert len(condition["message"]) == ragmodel_cr.MAX_MESSAGE
    assert _errors(validator, {**support_bot(), "status": {"conditions": [condition]}}) == []


def test_a_refusal_needs_a_reason_and_an_aware_time() -> None:
    with pytest.raises(ValueError, match="at least one reason"):
        refused_condition([], generation=1, now=NOW)
    with pytest.raises(ValueError, match="time zone"):
        refused_condition(["a"], generation=1, now=datetime(2026, 12, 2))


def test_parser_imports_neither_the_control_path_nor_the_gateway() -> None:
    code = (
        "import sys, converge.runtime.kubernetes.ragmodel_cr; "
        "print([m for m in sys.modules if m.startswith(('converge.control', 'converge.gateway'))])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- properties ------------------------------------------------------------------------------

NAMES = st.one_of(
    st.from_regex(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", fullmatch=True),
    st.text(max_size=70),
)
SCALARS = st.one_of(
    st.text(max_size=1100), st.booleans(), st.integers(), st.floats(allow_nan=False), st.none()
)
RETRIEVAL = st.fixed_dictionaries(
    {},
    optional={
        "k": st.one_of(st.integers(min_value=-5, max_value=60), st.floats(allow_nan=False), st.booleans()),
        "mode": st.sampled_from(["vector", "keyword", "hybrid", "semantic", ""]),
        "minScore": st.one_of(st.floats(min_value=-1, max_value=2, allow_nan=False), st.text(max_size=3)),
        "filters": st.dictionaries(st.text(min_size=1, max_size=10), SCALARS, max_size=18),
    },
)
SPECS = st.fixed_dictionaries(
    {},
    optional={
        "chatDeployment": NAMES,
        "knowledgeBases": st.lists(NAMES, max_size=10),
        "ruleset": NAMES,
        "retrieval": RETRIEVAL,
        "promptTemplate": st.text(min_size=1, max_size=40),
    },
)


@settings(max_examples=300, deadline=None)
@given(spec=SPECS)
def test_what_the_crd_refuses_the_parser_refuses(
    validator: jsonschema.Draft202012Validator, spec: dict[str, Any]
) -> None:
    """Never more lenient than the CRD: a cluster without it (or with an older one) still gets
    every check. Filter values the schema keeps as given (lists, objects, null) are the parser's."""
    obj = {**support_bot(), "spec": spec}
    parsed = parse_ragmodel(obj)
    if not validator.is_valid(obj):
        assert isinstance(parsed, Refused)
    if isinstance(parsed, RAGModelSpec):
        assert 1 <= len(parsed.knowledge_bases) <= 8
        assert 1 <= parsed.retrieval.k <= 50
