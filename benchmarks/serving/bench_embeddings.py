"""Embeddings replica: texts/s for single-text requests at concurrency 1 and 16 vs one batch of 64.

Starts `python -m converge.serving embeddings` on the built-in MiniLM for each engine asked for
(ONNX Runtime, the default, and sentence-transformers on torch), one after the other so they
never share the CPU, and measures over HTTP, each phase for `--seconds` in all, in `--rounds`
turns with the others (so that a change in the machine's speed falls on all of them):

- c1: one single-text request at a time (latency p50/p95, texts/s), the RAG query path;
- c16: 16 clients each sending single-text requests (texts/s, latency p50/p95, the replica's mean
  batch size from /converge/stats);
- batch64: one request of 64 texts at a time (texts/s);
- the replica's CPU time per text in each phase (user + system, from /proc via psutil) and the
  client's, so runs on a busy machine stay comparable. The client is aiohttp, as the gateway's.

`c16_vs_batch64` is the issue's figure (target >= 0.8). Prints one JSON object.

    .venv/bin/python benchmarks/serving/bench_embeddings.py [--seconds 8] [--rounds 4] [--engines onnx,torch]
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
from dataclasses import dataclass, field
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


@dataclass
class Phase:
    """One load shape's measurements, summed over the rounds it ran in."""

    clients: int
    per_request: int
    latencies: list[float] = field(default_factory=list)
    wall: float = 0.0
    cpu: float = 0.0  # the replica's user + system seconds
    own: float = 0.0  # the client's
    batches: int = 0

    def summary(self) -> dict[str, Any]:
        texts = len(self.latencies) * self.per_request
        return {
            "clients": self.clients,
            "texts_per_request": self.per_request,
            "requests": len(self.latencies),
            "texts_per_s": round(texts / self.wall, 1),
            "latency_ms_p50": pct(self.latencies, 0.5),
            "latency_ms_p95": pct(self.latencies, 0.95),
            "replica_cpu_ms_per_text": round(self.cpu * 1e3 / texts, 2),
            "client_cpu_ms_per_text": round(self.own * 1e3 / texts, 2),
            "mean_batch_texts": round(texts / self.batches, 2) if self.batches else None,
        }


async def phase(http: aiohttp.ClientSession, proc: psutil.Process, into: Phase, *, seconds: float) -> Phase:
    """Run `into`'s load for `seconds` and add what it measured to it."""
    counter = iter(range(10**9))
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        while time.perf_counter() < deadline:
            texts = [text(next(counter)) for _ in range(into.per_request)]
            start = time.perf_counter()
            async with http.post("/v1/embeddings", json={"model": "minilm", "input": texts}) as resp:
                resp.raise_for_status()
                await resp.read()
            into.latencies.append((time.perf_counter() - start) * 1e3)

    async def batches() -> int:
        async with http.get("/converge/stats") as resp:
            return int((await resp.json()).get("batches_total", 0))

    cpu_before, own_before = sum(proc.cpu_times()[:2]), time.process_time()
    batches_before = await batches()
    began = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(into.clients)))
    into.wall += time.perf_counter() - began
    into.cpu += sum(proc.cpu_times()[:2]) - cpu_before
    into.own += time.process_time() - own_before
    into.batches += await batches() - batches_before
    return into


def start(engine: str, *, port: int, threads: int, max_wait_ms: float) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "converge.serving", "embeddings", "--model-path", str(minilm_path())]
    cmd += ["--model-name", "minilm", "--port", str(port), "--engine", engine, "--threads", str(threads)]
    cmd += ["--max-wait-ms", str(max_wait_ms)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def measure(
    engine: str, *, seconds: float, rounds: int, threads: int, max_wait_ms: float
) -> dict[str, Any]:
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
            await phase(http, watched, Phase(clients=4, per_request=4), seconds=1)  # warm-up
            c1, c16, batch = Phase(1, 1), Phase(16, 1), Phase(1, 64)
            # In turns, so that a change in the machine's speed (other tenants) falls on all three.
            for _ in range(rounds):
                for each in (c1, c16, batch):
                    await phase(http, watched, each, seconds=seconds / rounds)
        c16_vs_batch64 = c16.summary()["texts_per_s"] / batch.summary()["texts_per_s"]
        return {
            "engine": engine,
            "ready_s": round(ready_s, 1),
            "c1": c1.summary(),
            "c16": c16.summary(),
            "batch64": batch.summary(),
            "c16_vs_batch64": round(c16_vs_batch64, 3),
        }
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="per phase, all rounds (default: 8)")
    parser.add_argument(
        "--rounds", type=int, default=4, help="the phases run in turn this many times (default: 4)"
    )
    parser.add_argument("--engines", default="onnx,torch", help="comma-separated (default: onnx,torch)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--max-wait-ms", type=float, default=0.0)
    args = parser.parse_args()
    results = [
        asyncio.run(
            measure(
                e,
                seconds=args.seconds,
                rounds=args.rounds,
                threads=args.threads,
                max_wait_ms=args.max_wait_ms,
            )
        )
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
