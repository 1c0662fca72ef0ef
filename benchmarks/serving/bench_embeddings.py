"""Embeddings replica: texts/s for single-text requests at concurrency 1 and 16 vs one batch of 64.

Starts `python -m converge.serving embeddings` on the built-in MiniLM for each engine asked for
(ONNX Runtime, the default, and sentence-transformers on torch), one after the other so they
never share the CPU, and measures over HTTP:

- c1: one single-text request at a time (latency p50/p95, texts/s), the RAG query path;
- c16: 16 clients each sending single-text requests (texts/s, latency p50/p95, the replica's mean
  batch size from /converge/stats);
- batch64: one request of 64 texts at a time (texts/s);
- the replica's CPU time per text in each phase (user + system, from /proc via psutil) and the
  client's, so runs on a busy machine stay comparable. The client is aiohttp, as the gateway's.

`c16_vs_batch64` is the issue's figure (target >= 0.8). Prints one JSON object.

    .venv/bin/python benchmarks/serving/bench_embeddings.py [--seconds 8] [--engines onnx,torch]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

import aiohttp
import psutil

from converge.control.library.catalogue import minilm_path

# Short texts of the length RAG queries and chat messages have (8-20 words).
WORDS = (
    "the retry policy for uploads backs off exponentially when the object store answers with a "
    "throttling error and gives up after the configured number of attempts while logging each one"
).split()


def text(i: int) -> str:
    start = i % len(WORDS)
    return " ".join((WORDS[start:] + WORDS[:start])[: 8 + i % 13]) + f" #{i}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


async def phase(
    http: aiohttp.ClientSession, proc: psutil.Process, *, clients: int, per_request: int, seconds: float
) -> dict[str, Any]:
    latencies: list[float] = []
    counter = iter(range(10**9))
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        while time.perf_counter() < deadline:
            texts = [text(next(counter)) for _ in range(per_request)]
            start = time.perf_counter()
            async with http.post("/v1/embeddings", json={"model": "minilm", "input": texts}) as resp:
                resp.raise_for_status()
                await resp.read()
            latencies.append((time.perf_counter() - start) * 1e3)

    async def stats() -> dict[str, Any]:
        async with http.get("/converge/stats") as resp:
            return dict(await resp.json())

    cpu_before, own_before = sum(proc.cpu_times()[:2]), time.process_time()
    stats_before = await stats()
    began = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - began
    cpu, own = sum(proc.cpu_times()[:2]) - cpu_before, time.process_time() - own_before
    stats_after = await stats()
    texts = len(latencies) * per_request
    batches = stats_after.get("batches_total", 0) - stats_before.get("batches_total", 0)
    return {
        "clients": clients,
        "texts_per_request": per_request,
        "requests": len(latencies),
        "texts_per_s": round(texts / wall, 1),
        "latency_ms_p50": pct(latencies, 0.5),
        "latency_ms_p95": pct(latencies, 0.95),
        "replica_cpu_ms_per_text": round(cpu * 1e3 / texts, 2),
        "client_cpu_ms_per_text": round(own * 1e3 / texts, 2),
        "mean_batch_texts": round(texts / batches, 2) if batches else None,
    }


def start(engine: str, *, port: int, threads: int, max_wait_ms: float) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "converge.serving", "embeddings", "--model-path", str(minilm_path())]
    cmd += ["--model-name", "minilm", "--port", str(port), "--engine", engine, "--threads", str(threads)]
    cmd += ["--max-wait-ms", str(max_wait_ms)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def measure(engine: str, *, seconds: float, threads: int, max_wait_ms: float) -> dict[str, Any]:
    port = free_port()
    proc = start(engine, port=port, threads=threads, max_wait_ms=max_wait_ms)
    try:
        # The gateway's own upstream client: the benchmark shares the replica's two cores, so a
        # slow client would be measured as a slow server.
        connector = aiohttp.TCPConnector(limit=32)
        timeout = aiohttp.ClientTimeout(total=120)
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession(base, connector=connector, timeout=timeout) as http:
            loaded = time.perf_counter()
            while True:
                try:
                    async with http.get("/health/ready") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                if proc.poll() is not None:
                    raise SystemExit(f"the {engine} replica exited with {proc.returncode}")
                await asyncio.sleep(0.1)
            ready_s = time.perf_counter() - loaded
            watched = psutil.Process(proc.pid)
            await phase(http, watched, clients=4, per_request=4, seconds=1)  # warm-up
            c1 = await phase(http, watched, clients=1, per_request=1, seconds=seconds)
            c16 = await phase(http, watched, clients=16, per_request=1, seconds=seconds)
            batch = await phase(http, watched, clients=1, per_request=64, seconds=seconds)
        return {
            "engine": engine,
            "ready_s": round(ready_s, 1),
            "c1": c1,
            "c16": c16,
            "batch64": batch,
            "c16_vs_batch64": round(c16["texts_per_s"] / batch["texts_per_s"], 3),
        }
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="per phase (default: 8)")
    parser.add_argument("--engines", default="onnx,torch", help="comma-separated (default: onnx,torch)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--max-wait-ms", type=float, default=0.0)
    args = parser.parse_args()
    results = [
        asyncio.run(measure(e, seconds=args.seconds, threads=args.threads, max_wait_ms=args.max_wait_ms))
        for e in args.engines.split(",")
    ]
    print(
        json.dumps(
            {
                "benchmark": "embeddings_dynamic_batching",
                "threads": args.threads,
                "max_wait_ms": args.max_wait_ms,
                "load_average": [round(x, 2) for x in os.getloadavg()],
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
