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
    base_url: str, model: str, *, max_tokens: int = 48, rounds: int = 2
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as http:
        await _chat_once(http, model, "Hi", 4)  # warm-up
        for concurrency in (1, 4):
            runs: list[dict[str, float]] = []
            t0 = time.perf_counter()
            for r in range(rounds):
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
    return {
        "ttft_ms": c1["ttft_ms_p50"],
        "tokens_per_s": c1["tokens_per_s"],
        "latency_ms_p50": c1["latency_ms_p50"],
        "latency_ms_p95": c1["latency_ms_p95"],
        "concurrency": results,
    }


async def benchmark_embeddings(
    base_url: str, model: str, *, batch: int = 16, rounds: int = 4
) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as http:
        (await http.post("/v1/embeddings", json={"model": model, "input": TEXTS[:2]})).raise_for_status()
        t0 = time.perf_counter()
        done = 0
        for r in range(rounds):
            chunk = TEXTS[(r * batch) % len(TEXTS) :][:batch]
            resp = await http.post("/v1/embeddings", json={"model": model, "input": chunk})
            resp.raise_for_status()
            done += len(resp.json()["data"])
        wall = time.perf_counter() - t0
    return {"texts_per_s": round(done / wall, 1), "batch": batch}
