"""A model's shape for the memory maths, read from what the library's inspectors recorded.

The inspectors (control/library/inspection: gguf_facts, hf_facts, safetensors_facts) store
`parameter_count`, `quantization` or `dtypes`, `memory_bytes`, `context_length`,
`kv_cache_bytes_per_1k_tokens` and, under `extra`, the attention shape: GGUF's `block_count`,
`head_count`, `head_count_kv`, `embedding_length`; config.json's `num_hidden_layers`,
`num_attention_heads`, `num_key_value_heads`, `head_dim`, `hidden_size`, `torch_dtype`. Nothing
is guessed: a fact that is not there is reported missing, with what it was needed for.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Serving engines (llama.cpp, vLLM) keep the KV cache in f16 unless told otherwise; the
# inspectors size kv_cache_bytes_per_1k_tokens with the same 2 bytes.
KV_ELEMENT_BYTES = 2

# Bytes per weight of the storage types that are one type throughout: GGML's block sizes
# (bytes per block / weights per block, e.g. Q8_0 is 34 bytes per 32 weights) and plain dtypes.
# A GGUF "mostly Q4_K_M" file mixes several; its own bytes per parameter are used instead.
WEIGHT_BYTES: dict[str, float] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "Q8_0": 34 / 32,
    "Q6_K": 210 / 256,
    "Q5_1": 24 / 32,
    "Q5_0": 22 / 32,
    "Q4_1": 20 / 32,
    "Q4_0": 18 / 32,
    "IQ4_NL": 18 / 32,
    "IQ4_XS": 136 / 256,
    "I8": 1,
    "U8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
TORCH_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64"}


@dataclass(frozen=True)
class Missing:
    fact: str  # where in the version's library record it would be
    needed_for: str


@dataclass(frozen=True)
class ModelShape:
    """What the memory maths needs, each number with where it came from."""

    parameters: int
    bytes_per_weight: float
    weight_source: str
    kv_bytes_per_token: int
    kv_source: str
    context_length: int | None = None  # the context the model was trained for, when known
    layers: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _first(extra: Mapping[str, Any], *keys: str) -> int | None:
    for key in keys:
        if (found := _int(extra.get(key))) is not None:
            return found
    return None


def weight_bytes(inspection: Mapping[str, Any]) -> tuple[float, str] | None:
    """(bytes per weight, where that came from), or None when the record cannot tell."""
    quantization = inspection.get("quantization")
    dtypes = [d for d in inspection.get("dtypes") or [] if isinstance(d, str)]
    torch_dtype = TORCH_DTYPES.get(str((inspection.get("extra") or {}).get("torch_dtype")))
    named = quantization if isinstance(quantization, str) else None
    if named is None and len(set(dtypes)) == 1:
        named = dtypes[0]
    if named is None and not dtypes and torch_dtype:
        named = torch_dtype
    if named is not None and named.upper() in WEIGHT_BYTES:
        return WEIGHT_BYTES[
            named.upper()
        ], f"{named.upper()}: {WEIGHT_BYTES[named.upper()]:g} bytes per weight"
    parameters, size = _int(inspection.get("parameter_count")), _int(inspection.get("memory_bytes"))
    if parameters and size:
        if named:
            kind = f"{named} mixes storage types: "
        elif dtypes:
            kind = f"the weights mix {', '.join(sorted(set(dtypes)))}: "
        else:
            kind = ""
        return size / parameters, f"{kind}the file's {size:,} bytes / {parameters:,} parameters"
    return None


def kv_per_token(inspection: Mapping[str, Any]) -> tuple[int, str, dict[str, int]] | list[Missing]:
    """(KV cache bytes per token of context, how, the shape used), or what is missing."""
    extra = inspection.get("extra") or {}
    if inspection.get("format") == "sentence-transformers" or "embedding_dimension" in extra:
        return 0, "an encoder (embedding model) keeps no KV cache", {}
    layers = _first(extra, "block_count", "num_hidden_layers")
    heads = _first(extra, "head_count", "num_attention_heads")
    kv_heads = _first(extra, "head_count_kv", "num_key_value_heads")
    head_dim = _first(extra, "head_dim")
    width = _first(extra, "embedding_length", "hidden_size")
    kv_note = ""
    if kv_heads is None and heads is not None:
        kv_heads, kv_note = heads, " (no separate KV head count: every attention head keeps K and V)"
    if head_dim is None and heads and width:
        head_dim = width // heads
    if layers and kv_heads and head_dim:
        per_token = 2 * layers * kv_heads * head_dim * KV_ELEMENT_BYTES
        how = (
            f"2 (K and V) x {layers} layers x {kv_heads} KV heads x {head_dim} head dim"
            f" x {KV_ELEMENT_BYTES} bytes (f16){kv_note}"
        )
        return per_token, how, {"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim}
    per_1k = _int(inspection.get("kv_cache_bytes_per_1k_tokens"))
    if per_1k:  # e.g. per-layer head counts, which the inspector summed itself
        return per_1k // 1000, f"the library's kv_cache_bytes_per_1k_tokens {per_1k:,} / 1000", {}
    missing = []
    if not layers:
        missing.append(Missing("inspection.extra.block_count (num_hidden_layers)", "KV cache: layers"))
    if not kv_heads:
        missing.append(Missing("inspection.extra.head_count_kv (num_key_value_heads)", "KV cache: KV heads"))
    if not head_dim:
        missing.append(
            Missing("inspection.extra.head_dim (or embedding_length and head_count)", "KV cache: head dim")
        )
    return missing


def model_shape(inspection: Mapping[str, Any]) -> ModelShape | list[Missing]:
    """The shape the memory maths needs, or every fact that is missing for it."""
    missing: list[Missing] = []
    parameters = _int(inspection.get("parameter_count"))
    if parameters is None:
        missing.append(Missing("inspection.parameter_count", "weights: parameters x bytes per weight"))
    weights = weight_bytes(inspection)
    if weights is None:
        missing.append(
            Missing("inspection.quantization (or dtypes, or memory_bytes)", "weights: bytes per weight")
        )
    kv = kv_per_token(inspection)
    if isinstance(kv, list):
        missing += kv
    if missing or parameters is None or weights is None or isinstance(kv, list):
        return missing
    per_token, how, shape = kv
    return ModelShape(
        parameters=parameters,
        bytes_per_weight=weights[0],
        weight_source=weights[1],
        kv_bytes_per_token=per_token,
        kv_source=how,
        context_length=_int(inspection.get("context_length")),
        **shape,
    )
