"""Facts from a GGUF file's metadata and tensor table (llama.cpp's format)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf

from converge.control.library.inspection.results import Inspection, InspectionError

# Serving engines (llama.cpp, vLLM) keep the KV cache in f16 unless told otherwise.
KV_CACHE_ELEMENT_BYTES = 2


def inspect_gguf(path: Path) -> Inspection:
    try:
        # GGUFReader memory-maps the file; tensor data is never read, only the header pages.
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # untrusted bytes can break the parser in many ways; all mean "not GGUF"
        raise InspectionError(f"{path.name} is not a readable GGUF file: {exc}") from exc

    def value(key: str) -> Any:
        found = reader.get_field(key)
        return found.contents() if found is not None else None

    arch = value("general.architecture")
    parameter_count = sum(int(tensor.n_elements) for tensor in reader.tensors)
    extra = {
        key.removeprefix("general."): value(key)
        for key in ("general.name", "general.basename", "general.size_label", "general.organization")
        if value(key) is not None
    }
    extra["gguf_version"] = value("GGUF.version")
    extra["tensor_count"] = len(reader.tensors)
    for name in ("embedding_length", "block_count", "attention.head_count", "attention.head_count_kv"):
        if arch and value(f"{arch}.{name}") is not None:
            extra[name.replace("attention.", "")] = value(f"{arch}.{name}")
    return Inspection(
        format="gguf",
        architecture=arch,
        parameter_count=parameter_count,
        quantization=quantization_name(value("general.file_type")),
        context_length=value(f"{arch}.context_length") if arch else None,
        chat_template=value("tokenizer.chat_template"),
        dtypes=sorted({tensor.tensor_type.name for tensor in reader.tensors}),
        license=value("general.license"),
        # llama.cpp maps the file and keeps every tensor resident: the file is the weight footprint.
        memory_bytes=path.stat().st_size,
        kv_cache_bytes_per_1k_tokens=_kv_cache_bytes(value, arch),
        files=[path.name],
        extra=extra,
    )


def quantization_name(file_type: int | None) -> str | None:
    """llama.cpp's name for `general.file_type`, e.g. 3 -> "Q4_1", 0 -> "F32"."""
    if file_type is None:
        return None
    names = getattr(gguf, "LlamaFileType", None)
    if names is None:
        return f"file_type_{file_type}"
    try:
        member = names(file_type)
    except ValueError:
        return f"file_type_{file_type}"
    if member.name == "GUESSED":
        return None
    return member.name.removeprefix("MOSTLY_").removeprefix("ALL_")


def _per_layer(value: Any, layers: int) -> list[int]:
    # Some architectures (e.g. OpenELM) store a head count per layer instead of one number.
    if isinstance(value, list):
        return [int(item) for item in value]
    return [int(value)] * layers


def _kv_cache_bytes(value: Callable[[str], Any], arch: str | None) -> int | None:
    if not arch or value(f"{arch}.pooling_type") is not None or value(f"{arch}.attention.causal") is False:
        return None  # embedding / encoder models keep no KV cache
    layers = value(f"{arch}.block_count")
    heads = value(f"{arch}.attention.head_count")
    embedding = value(f"{arch}.embedding_length")
    if layers is None or heads is None or embedding is None:
        return None  # recurrent models (mamba, rwkv) have no attention KV cache to size
    kv_heads = value(f"{arch}.attention.head_count_kv")
    head_counts = _per_layer(heads, layers)
    kv_counts = _per_layer(kv_heads if kv_heads is not None else heads, layers)
    default_head_dim = embedding // max(head_counts)
    key_dim = value(f"{arch}.attention.key_length") or default_head_dim
    value_dim = value(f"{arch}.attention.value_length") or default_head_dim
    per_token = sum(kv * (key_dim + value_dim) for kv in kv_counts) * KV_CACHE_ELEMENT_BYTES
    return int(per_token * 1000)
