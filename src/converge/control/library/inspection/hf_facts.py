"""Facts from the small text files of a Hugging Face style model folder.

config.json (architecture, context, attention shape), the tokenizer's chat template, the model
card's licence and the sentence-transformers module files. None of these touch weights.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from converge.control.library.inspection.results import InspectionError

# Serving engines keep the KV cache in f16/bf16 by default.
KV_CACHE_ELEMENT_BYTES = 2
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
# Only generative heads keep a KV cache; encoders (BERT, sentence embedders) recompute per request.
_GENERATIVE_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
_LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "LICENCE", "LICENCE.txt", "COPYING")
_CARD_FIELD = re.compile(r"^(license|license_name):[ \t]*(.*?)[ \t]*$", re.MULTILINE)
_CARD_LIST_ITEM = re.compile(r"^license:[ \t]*\n[ \t]*-[ \t]*(\S+)", re.MULTILINE)


def read_json(path: Path) -> Any:
    """The parsed file, or None when it is absent. A present but broken file is an error."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InspectionError(f"{path.name} is not valid JSON: {exc}") from exc


def config_facts(config: dict[str, Any]) -> dict[str, Any]:
    """architecture, context_length, kv_cache_bytes_per_1k_tokens and shape facts for `extra`."""
    # Multimodal configs nest the language model's numbers under text_config.
    nested = config.get("text_config")
    text: dict[str, Any] = nested if isinstance(nested, dict) else config
    architectures = config.get("architectures") or []
    architecture = architectures[0] if architectures else config.get("model_type")
    context = next((text[key] for key in _CONTEXT_KEYS if isinstance(text.get(key), int)), None)
    shape_keys = (
        "model_type",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "torch_dtype",
    )
    shape = {key: text.get(key, config.get(key)) for key in shape_keys}
    generative = any(str(name).endswith(_GENERATIVE_SUFFIXES) for name in architectures)
    return {
        "architecture": architecture,
        "context_length": context,
        "kv_cache_bytes_per_1k_tokens": _kv_cache_bytes(text) if generative else None,
        "extra": {key: value for key, value in shape.items() if value is not None},
    }


def _kv_cache_bytes(text: dict[str, Any]) -> int | None:
    layers = text.get("num_hidden_layers")
    heads = text.get("num_attention_heads")
    hidden = text.get("hidden_size")
    if not (isinstance(layers, int) and isinstance(heads, int) and heads > 0):
        return None
    kv_heads = text.get("num_key_value_heads") or heads
    head_dim = text.get("head_dim") or (hidden // heads if isinstance(hidden, int) else None)
    if not head_dim:
        return None
    return 2 * layers * kv_heads * head_dim * KV_CACHE_ELEMENT_BYTES * 1000


def chat_template(folder: Path) -> str | None:
    """The Jinja chat template, from wherever this transformers generation put it."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in ("tokenizer_config.json", "chat_template.json"):
        config = read_json(folder / name)
        template = config.get("chat_template") if isinstance(config, dict) else None
        if isinstance(template, str):
            return template
        if isinstance(template, list):
            # Named templates: [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
            named = {item.get("name"): item.get("template") for item in template if isinstance(item, dict)}
            return named.get("default") or next(iter(named.values()), None)
    return None


def license_facts(folder: Path) -> tuple[str | None, dict[str, Any]]:
    """The licence id from the model card front matter, else a recognised LICENSE file."""
    extra: dict[str, Any] = {}
    license_file = next((folder / name for name in _LICENSE_FILES if (folder / name).is_file()), None)
    if license_file is not None:
        extra["license_file"] = license_file.name
    readme = folder / "README.md"
    card = _card_license(readme.read_text(encoding="utf-8", errors="replace")) if readme.is_file() else None
    if card is None and license_file is not None:
        card = _recognise_license_text(license_file.read_text(encoding="utf-8", errors="replace")[:4096])
    return card, extra


def _card_license(text: str) -> str | None:
    if not text.startswith("---"):
        return None
    end = text.find("\n---", 3)
    front = text[3:end] if end != -1 else ""
    fields = {key: value.strip("'\"") for key, value in _CARD_FIELD.findall(front)}
    if fields.get("license") == "other" and fields.get("license_name"):
        return fields["license_name"]  # e.g. "llama3": more useful to a policy than "other"
    if fields.get("license"):
        return fields["license"]
    listed = _CARD_LIST_ITEM.search(front)
    return listed.group(1).strip("'\"") if listed else None


def _recognise_license_text(text: str) -> str | None:
    if "Apache License" in text and "Version 2.0" in text:
        return "apache-2.0"
    if "MIT License" in text or "Permission is hereby granted, free of charge" in text:
        return "mit"
    return None


def sentence_transformers_facts(folder: Path) -> dict[str, Any]:
    """Embedding dimension, sequence limit and pipeline modules, for the embeddings server."""
    facts: dict[str, Any] = {}
    modules = read_json(folder / "modules.json") or []
    facts["modules"] = [str(module.get("type", "")).rsplit(".", 1)[-1] for module in modules]
    bert_config = read_json(folder / "sentence_bert_config.json") or {}
    if "max_seq_length" in bert_config:
        facts["max_seq_length"] = bert_config["max_seq_length"]
    dimension = None
    for module in modules:
        module_config = read_json(folder / str(module.get("path", "")) / "config.json") or {}
        # Pooling reports the transformer's width; a later Dense layer projects it elsewhere.
        width = module_config.get("out_features") or module_config.get("word_embedding_dimension")
        dimension = width or dimension
    if dimension is not None:
        facts["embedding_dimension"] = dimension
    return facts
