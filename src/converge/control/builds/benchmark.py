"""Measure a running model server: the figures builds store and deployment policies read."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from typing import Any

import httpx

PROMPTS = [
    "Write one sentence about the sea.",
    "Name three colours.",
    "What is the capital of France?",
    "Give a short tip for learning to code.",
]
TEXTS = [f"Sentence number {i} about models, data and the cost of serving them." for i in range(64)]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def _chat_once(http: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> dict[str, float]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": True,
        "temperature": 0.0,
    }
    start = time.perf_counter()
    first: float | None = None
    tokens = 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0].get("delta", {})
            if delta.get("content"):
                tokens += 1  # llama.cpp streams one token per chunk
                first = first or time.perf_counter()
    end = time.perf_counter()
    first = first or end
    gen = end - first
    return {
        "ttft_ms": (first - start) * 1e3,
        "latency_ms": (end - start) * 1e3,
        "tokens": tokens,
        "tokens_per_s": (tokens - 1) / gen if tokens > 1 and gen > 0 else 0.0,
    }


async def benchmark_llm(
    base_url: str, model: str, *, max_tokens: int = 48, rounds: int = 2, levels: tuple[int, ...] = (1, 4, 8)
) -> dict[str, Any]:
    """Streamed chat at each concurrency level: time to first token, tokens/s per request and in
    total. Flat keys (`tokens_per_s_c4`, `ttft_ms_c4`, ...) are what deployment policies read."""
    results: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as http:
        await _chat_once(http, model, "Hi", 4)  # warm-up
        for concurrency in levels:
            runs: list[dict[str, float]] = []
            t0 = time.perf_counter()
            for r in range(max(1, min(rounds, 8 // concurrency))):  # 8 requests at most per level
                batch = [PROMPTS[(r * concurrency + i) % len(PROMPTS)] for i in range(concurrency)]
                runs += await asyncio.gather(*(_chat_once(http, model, p, max_tokens) for p in batch))
            wall = time.perf_counter() - t0
            lat = [x["latency_ms"] for x in runs]
            results[f"c{concurrency}"] = {
                "requests": len(runs),
                "ttft_ms_p50": round(statistics.median(x["ttft_ms"] for x in runs), 1),
                "latency_ms_p50": round(_pct(lat, 0.5), 1),
                "latency_ms_p95": round(_pct(lat, 0.95), 1),
                "tokens_per_s": round(statistics.mean(x["tokens_per_s"] for x in runs), 1),
                "aggregate_tokens_per_s": round(sum(x["tokens"] for x in runs) / wall, 1),
            }
    c1 = results["c1"]
    flat = {}
    for level, figures in results.items():
        flat[f"tokens_per_s_{level}"] = figures["aggregate_tokens_per_s"]
        flat[f"ttft_ms_{level}"] = figures["ttft_ms_p50"]
    return {
        "ttft_ms": c1["ttft_ms_p50"],
        "tokens_per_s": c1["tokens_per_s"],
        "latency_ms_p50": c1["latency_ms_p50"],
        "latency_ms_p95": c1["latency_ms_p95"],
        **flat,
        "concurrency": results,
    }


async def benchmark_embeddings(
    base_url: str, model: str, *, batch: int = 16, rounds: int = 4, singles: int = 32, clients: int = 16
) -> dict[str, Any]:
    """Texts/s for batches of `batch` texts, and for single-text requests (the RAG query path)
    one at a time (`texts_per_s_c1`, with latency percentiles) and from `clients` at once
    (`texts_per_s_c16`), which a server that batches dynamically answers near batch speed."""
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as http:

        async def embed(texts: list[str]) -> int:
            resp = await http.post("/v1/embeddings", json={"model": model, "input": texts})
            resp.raise_for_status()
            return len(resp.json()["data"])

        await embed(TEXTS[:2])
        t0 = time.perf_counter()
        done = 0
        for r in range(rounds):
            done += await embed(TEXTS[(r * batch) % len(TEXTS) :][:batch])
        batched = done / (time.perf_counter() - t0)

        latencies = []
        for i in range(singles):
            start = time.perf_counter()
            await embed([TEXTS[i % len(TEXTS)]])
            latencies.append((time.perf_counter() - start) * 1e3)
        alone = len(latencies) / (sum(latencies) / 1e3)

        async def client(offset: int) -> int:
            return sum([await embed([TEXTS[(offset + i) % len(TEXTS)]]) for i in range(singles // 4)])

        t0 = time.perf_counter()
        together = sum(await asyncio.gather(*(client(c) for c in range(clients)))) / (
            time.perf_counter() - t0
        )
    return {
        "texts_per_s": round(batched, 1),
        "batch": batch,
        "texts_per_s_c1": round(alone, 1),
        f"texts_per_s_c{clients}": round(together, 1),
        "latency_ms_p50": round(_pct(latencies, 0.5), 1),
        "latency_ms_p95": round(_pct(latencies, 0.95), 1),
    }


# ONNX element types (as inspection records them) as V2 datatypes.
_ONNX_TO_V2 = {
    "FLOAT": "FP32",
    "DOUBLE": "FP64",
    "FLOAT16": "FP16",
    "INT8": "INT8",
    "INT16": "INT16",
    "INT32": "INT32",
    "INT64": "INT64",
    "UINT8": "UINT8",
    "UINT16": "UINT16",
    "UINT32": "UINT32",
    "UINT64": "UINT64",
    "BOOL": "BOOL",
    "STRING": "BYTES",
}


def _v2_input_spec(fact: dict[str, Any]) -> dict[str, Any] | None:
    """An inspection input ({name, dtype: ONNX type name, shape}) as V2 metadata, if it is a tensor."""
    datatype = _ONNX_TO_V2.get(str(fact.get("dtype")))
    if datatype is None:
        return None
    shape = [dim if isinstance(dim, int) and dim > 0 else -1 for dim in fact.get("shape") or []]
    return {"name": fact["name"], "datatype": datatype, "shape": shape}


def _v2_tensor(spec: dict[str, Any], batch: int) -> dict[str, Any]:
    """A request tensor for one declared input: `batch` rows where the first dimension is free."""
    shape = [
        (batch if i == 0 else 1) if not isinstance(dim, int) or dim < 0 else dim
        for i, dim in enumerate(spec.get("shape") or [-1])
    ]
    n = 1
    for dim in shape:
        n *= dim
    datatype = spec["datatype"]
    if datatype == "BYTES":
        data: list[Any] = [f"text {i % 7}" for i in range(n)]
    elif datatype == "BOOL":
        data = [i % 2 == 0 for i in range(n)]
    elif datatype.startswith("FP"):
        data = [((i * 37) % 101) / 50.0 - 1.0 for i in range(n)]  # spread over [-1, 1]
    else:
        data = [i % 3 for i in range(n)]
    return {"name": spec["name"], "shape": shape, "datatype": datatype, "data": data}


async def benchmark_v2(
    base_url: str,
    model: str,
    *,
    inputs: list[dict[str, Any]] | None = None,
    batch: int = 64,
    rounds: int = 20,
) -> dict[str, Any]:
    """Rows per second through `POST /v2/models/{model}/infer`, one request at a time.

    The request is derived from the model: the inputs its server declares in the V2 metadata
    (`GET /v2/models/{model}`: the ONNX graph's inputs, an MLflow signature, or the feature
    count the V2 replica reads from a scikit-learn model), else `inputs`, the inspection's facts
    ({name, dtype, shape} with ONNX type names). Free dimensions get `batch` (the first) or 1.
    """
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as http:
        meta = await http.get(f"/v2/models/{model}")
        meta.raise_for_status()
        declared = meta.json().get("inputs") or []
        if not declared:
            declared = [spec for fact in inputs or [] if (spec := _v2_input_spec(fact)) is not None]
        if not declared:
            raise RuntimeError(
                f"cannot benchmark {model!r}: its server declares no V2 inputs and the inspection found none"
            )
        body = {"inputs": [_v2_tensor(spec, batch) for spec in declared]}
        rows = body["inputs"][0]["shape"][0] if body["inputs"][0]["shape"] else 1
        warm = await http.post(f"/v2/models/{model}/infer", json=body)
        if warm.status_code != 200:
            raise RuntimeError(f"the benchmark request was refused ({warm.status_code}): {warm.text[:500]}")
        latencies: list[float] = []
        t0 = time.perf_counter()
        for _ in range(rounds):
            start = time.perf_counter()
            (await http.post(f"/v2/models/{model}/infer", json=body)).raise_for_status()
            latencies.append((time.perf_counter() - start) * 1e3)
        wall = time.perf_counter() - t0
    return {
        "rows_per_s": round(rows * rounds / wall, 1),
        "batch": rows,
        "latency_ms_p50": round(_pct(latencies, 0.5), 2),
        "latency_ms_p95": round(_pct(latencies, 0.95), 2),
        "inputs": [
            {"name": t["name"], "datatype": t["datatype"], "shape": t["shape"]} for t in body["inputs"]
        ],
    }


async def benchmark_server(
    server: str, base_url: str, model: str, *, inputs: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The figures for a server kind (a `ServerKind` or a Kubernetes serving runtime, whose
    values are the same strings; vLLM speaks the same OpenAI API as llama.cpp)."""
    if server in ("llama-cpp", "vllm"):
        return await benchmark_llm(base_url, model)
    if server == "v2":
        # The server's V2 metadata decides the request; the inspection's inputs are the fallback.
        return await benchmark_v2(base_url, model, inputs=inputs)
    if server == "embeddings":
        return await benchmark_embeddings(base_url, model)
    raise ValueError(f"no benchmark for server {server!r} (llama-cpp, vllm, v2 or embeddings)")
