"""Chat templates (Jinja) as a code path: parsed into an AST, never rendered.

A chat template runs on the serving host for every request. llama.cpp's server renders GGUF
templates with its own C++ Jinja subset (no Python objects to reach), and transformers-based
servers in jinja2's ImmutableSandboxedEnvironment, which refuses `_`-prefixed attributes at
render time; this check is the registration-time layer in front of both, so a template written
to escape a sandbox (`{{ cycler.__init__.__globals__ }}`) is rejected before it is ever served.
Flagged as dangerous:

- attribute or item access to a name starting with `_`, including through `|attr(...)`, the
  `attribute=` of filters such as `map`/`selectattr`/`sort`, and `{% set ns._x %}`;
- an item name built at render time inside the subscript (`x['_' ~ '_class__']`), or passed
  to `|attr` as anything but a string literal;
- any global a chat template has no use for: templates see the request (messages, tools, ...),
  special tokens and the helpers renderers pass (raise_exception, strftime_now), plus Jinja's
  own `range`, `namespace`, `dict`, `loop`; `cycler`, `joiner`, `lipsum` and anything else are
  refused;
- `{% include %}`, `{% import %}` and `{% extends %}`, which load other templates.

What a static check cannot see (a `_` name assembled in a variable first and used later) is
left to the sandbox.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from typing import IO, Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from converge.control.library.inspection.results import Finding

# Variables renderers pass to chat templates (transformers' apply_chat_template, llama-cpp-python,
# llama.cpp's server), and Jinja's own harmless globals and constants.
ALLOWED_NAMES = frozenset(
    {
        "messages", "add_generation_prompt", "tools", "documents", "functions", "function_call",
        "tool_choice", "custom_tools", "builtin_tools", "tools_in_user_message", "date_string",
        "enable_thinking", "reasoning_effort", "continue_final_message", "chat_template_kwargs",
        "bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token",
        "additional_special_tokens", "controls", "available_tools", "xml_tools", "python_tools",
        "image_count", "add_vision_id", "raise_exception", "strftime_now", "namespace", "range",
        "dict", "loop", "true", "false", "none", "True", "False", "None",
    }
)  # fmt: skip
# Filters whose argument names an attribute to read.
_ATTRIBUTE_FILTERS = frozenset({"map", "selectattr", "rejectattr", "sort", "groupby", "sum", "unique", "min"})
_ATTRIBUTE_FILTERS |= {"max", "dictsort"}
MAX_TEMPLATE_CHARS = 4 * 1024 * 1024
TEMPLATE_FILES = frozenset({"tokenizer_config.json", "chat_template.json"})


class _GenerationTag(jinja2.ext.Extension):
    """Parses transformers' `{% generation %}` blocks (assistant masks) as plain bodies."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        parser.stream.skip(1)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


_ENVIRONMENT = ImmutableSandboxedEnvironment(extensions=[_GenerationTag, jinja2.ext.loopcontrols])


def template_findings(source: str, *, label: str) -> list[Finding]:
    """Dangerous constructs in one chat template, or an error when it does not parse."""
    if len(source) > MAX_TEMPLATE_CHARS:
        return [_finding(label, "error", f"the chat template is over {MAX_TEMPLATE_CHARS} characters")]
    try:
        tree = _ENVIRONMENT.parse(source)
    except jinja2.TemplateSyntaxError as exc:
        return [_finding(label, "error", f"the chat template does not parse: {exc}")]
    problems = dict.fromkeys(_problems(tree))  # ordered, without repeats
    return [_finding(label, "dangerous", f"chat template {problem}") for problem in problems]


def _problems(tree: nodes.Template) -> Iterator[str]:
    bound = _bound_names(tree)
    for node in tree.find_all(nodes.Node):
        if isinstance(node, nodes.Getattr | nodes.NSRef) and node.attr.startswith("_"):
            yield f"reads the private attribute {node.attr!r}"
        elif isinstance(node, nodes.Getitem):
            yield from _subscript(node.arg)
        elif isinstance(node, nodes.Filter):
            yield from _filter(node)
        elif isinstance(node, nodes.Name) and node.ctx == "load":
            if node.name not in ALLOWED_NAMES and node.name not in bound:
                yield f"uses the global {node.name!r}, which chat templates are not given"
        elif isinstance(node, nodes.Include | nodes.Import | nodes.FromImport | nodes.Extends):
            yield f"loads another template ({type(node).__name__.lower()})"


def _bound_names(tree: nodes.Template) -> set[str]:
    """Names the template binds itself: loop targets, {% set %}, macro names and parameters."""
    bound = {"caller", "varargs", "kwargs"}
    for node in tree.find_all(nodes.Name):
        if node.ctx in ("store", "param"):
            bound.add(node.name)
    for macro in tree.find_all(nodes.Macro):
        bound.add(macro.name)
    return bound


def _subscript(key: nodes.Node) -> Iterator[str]:
    if isinstance(key, nodes.Const):
        if isinstance(key.value, str) and key.value.startswith("_"):
            yield f"reads the private item {key.value!r}"
        return
    if any(isinstance(part, nodes.Concat | nodes.Filter | nodes.Call) for part in _self_and_below(key)):
        yield "reads an item whose name is computed while rendering"
    elif any(isinstance(part, nodes.Add) for part in _self_and_below(key)) and any(
        isinstance(const.value, str) for const in key.find_all(nodes.Const)
    ):
        yield "reads an item whose name is computed while rendering"


def _self_and_below(node: nodes.Node) -> Iterator[nodes.Node]:
    yield node
    yield from node.find_all(nodes.Node)


def _filter(node: nodes.Filter) -> Iterator[str]:
    if node.name == "attr":
        names = node.args[:1]
    elif node.name in _ATTRIBUTE_FILTERS:
        names = [keyword.value for keyword in node.kwargs if keyword.key == "attribute"]
        if node.name in ("map", "selectattr", "rejectattr") and node.args:
            names.append(node.args[0])  # map('upper'), selectattr('done'): a filter/test or attribute
    else:
        return
    for name in names:
        if not isinstance(name, nodes.Const) or not isinstance(name.value, str):
            yield f"passes a computed attribute name to |{node.name}"
        elif name.value.startswith("_") or "._" in name.value:
            yield f"reads the private attribute {name.value!r} through |{node.name}"


def _finding(label: str, severity: Any, message: str) -> Finding:
    return Finding(file=label, global_name=None, severity=severity, message=message)


def json_template_findings(stream: IO[bytes], *, label: str) -> list[Finding] | None:
    """Templates in tokenizer_config.json / chat_template.json; None when the file holds none."""
    try:
        config = json.loads(stream.read(MAX_TEMPLATE_CHARS * 4))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None  # not our business: the loader that reads it will fail the same way
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, str):
        return template_findings(template, label=label)
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        found: list[Finding] = []
        for item in template:
            if isinstance(item, dict) and isinstance(item.get("template"), str):
                found.extend(template_findings(item["template"], label=label))
        return found
    return None


# ---------------------------------------------------------------------------------------------
# GGUF metadata, read just far enough to find the templates (no tensor table, no memory map)

_GGUF_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_TEMPLATE_KEY = "tokenizer.chat_template"


class GGUFError(ValueError):
    pass


def gguf_templates(stream: IO[bytes]) -> dict[str, str]:
    """Every `tokenizer.chat_template[.name]` string in a GGUF file's key/value metadata."""
    size = stream.seek(0, 2)
    stream.seek(0)
    reader = _GGUFReader(stream, size=size)
    if reader.take(4) != b"GGUF":
        raise GGUFError("not a GGUF file")
    (version,) = struct.unpack("<I", reader.take(4))
    if version not in (2, 3):
        raise GGUFError(f"GGUF version {version} is not supported")
    _tensors, kv_count = struct.unpack("<QQ", reader.take(16))
    templates: dict[str, str] = {}
    for _ in range(kv_count):
        key = reader.string(limit=1 << 16)
        (kind,) = struct.unpack("<I", reader.take(4))
        if (key == _TEMPLATE_KEY or key.startswith(_TEMPLATE_KEY + ".")) and kind == _GGUF_STRING:
            templates[key] = reader.string(limit=MAX_TEMPLATE_CHARS * 4)
        else:
            reader.skip_value(kind)
    return templates


class _GGUFReader:
    def __init__(self, stream: IO[bytes], *, size: int) -> None:
        self.stream, self.size = stream, size

    def take(self, count: int) -> bytes:
        data = self.stream.read(count)
        if len(data) != count:
            raise GGUFError("the GGUF metadata is truncated")
        return data

    def length(self, unit: int) -> int:
        (count,) = struct.unpack("<Q", self.take(8))
        if count * unit > self.size - self.stream.tell():
            raise GGUFError("a GGUF metadata length points past the end of the file")
        return int(count)

    def string(self, *, limit: int) -> str:
        count = self.length(1)
        if count > limit:
            raise GGUFError(f"a GGUF metadata string is over {limit} bytes")
        return self.take(count).decode("utf-8", errors="replace")

    def skip_value(self, kind: int) -> None:
        if kind in _GGUF_SCALARS:
            self.stream.seek(_GGUF_SCALARS[kind], 1)
        elif kind == _GGUF_STRING:
            self.stream.seek(self.length(1), 1)
        elif kind == _GGUF_ARRAY:
            (item_kind,) = struct.unpack("<I", self.take(4))
            if item_kind in _GGUF_SCALARS:
                self.stream.seek(self.length(_GGUF_SCALARS[item_kind]) * _GGUF_SCALARS[item_kind], 1)
            elif item_kind == _GGUF_STRING:
                for _ in range(self.length(8)):  # every string is at least its 8-byte length
                    self.stream.seek(self.length(1), 1)
            else:
                raise GGUFError(f"GGUF arrays of type {item_kind} are not supported")
        else:
            raise GGUFError(f"unknown GGUF value type {kind}")


def gguf_findings(stream: IO[bytes], *, label: str) -> list[Finding]:
    try:
        templates = gguf_templates(stream)
    except GGUFError as exc:
        return [_finding(label, "error", f"GGUF metadata could not be read: {exc}")]
    found: list[Finding] = []
    for template in templates.values():
        found.extend(template_findings(template, label=label))
    return found
