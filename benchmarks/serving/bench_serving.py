"""Tokens/s and time to first token: a Converge replica vs llama-cpp-python in-process.

Same model (the built-in SmolLM2 GGUF), same prompts, same settings, greedy decoding, run one
after the other so they never share the CPU. Prints one JSON object; `replica_vs_inprocess`
is the replica's share of the in-process tokens/s (target >= 0.95).

    .venv/bin/python benchmarks/serving/bench_serving.py [--rounds 3] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx

from converge.control.library.catalogue import smollm2_path

PROMPTS = [
    "Write two sentences about the sea.",
    "Explain what a compiler does, briefly.",
    "List three uses of a paperclip.",
    "Describe a sunrise in one short paragraph.",
]
N_CTX = 2048


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def summarise(runs: list[dict[str, float]]) -> dict[str, float]:
    return {
        "requests": len(runs),
        "tokens": int(sum(r["tokens"] for r in runs)),
        "tokens_per_s": round(sum(r["tokens"] - 1 for r in runs) / sum(r["gen_s"] for r in runs), 2),
        "ttft_ms_p50": round(statistics.median(r["ttft_ms"] for r in runs), 1),
        "ttft_ms_max": round(max(r["ttft_ms"] for r in runs), 1),
    }


def in_process(path: str, *, rounds: int, max_tokens: int, threads: int) -> dict[str, float]:
    from llama_cpp import Llama

    # The replica's settings exactly: same threads for prompt and generation, same context.
    llm = Llama(model_path=path, n_ctx=N_CTX, n_threads=threads, n_threads_batch=threads, verbose=False)
    llm.create_chat_completion(messages=[{"role": "user", "content": "Hi"}], max_tokens=4)  # warm-up
    runs = []
    for _ in range(rounds):
        for prompt in PROMPTS:
            start = time.perf_counter()
            first = None
            tokens = 0
            for chunk in llm.create_chat_completion(
                messages=[{"role": "user", "content": prompt}],
                max_tokens=max_tokens,
                temperature=0.0,
                stream=True,
            ):
                if chunk["choices"][0]["delta"].get("content"):
                    tokens += 1
                    first = first or time.perf_counter()
            end = time.perf_counter()
            runs.append(
                {"tokens": tokens, "ttft_ms": ((first or end) - start) * 1e3, "gen_s": end - (first or end)}
            )
    del llm
    return summarise(runs)


def replica(path: str, *, rounds: int, max_tokens: int, threads: int) -> dict[str, float]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "converge.serving",
        "llama-cpp",
        "--model-path",
        path,
        "--model-name",
        "smollm2",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n-ctx",
        str(N_CTX),
        "--n-threads",
        str(threads),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as http:
            for _ in range(600):
                try:
                    if http.get("/health/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            http.post(
                "/v1/chat/completions",
                json={"model": "smollm2", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]},
            )
            runs = []
            for _ in range(rounds):
                for prompt in PROMPTS:
                    body = {
                        "model": "smollm2",
                        "messages": [{"role": "user", "content": prompt}],
                        "max_tokens": max_tokens,
                        "temperature": 0.0,
                        "stream": True,
                    }
                    start = time.perf_counter()
                    first = None
                    tokens = 0
                    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
                        for line in resp.iter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            if json.loads(line[6:])["choices"][0].get("delta", {}).get("content"):
                                tokens += 1
                                first = first or time.perf_counter()
                    end = time.perf_counter()
                    runs.append(
                        {
                            "tokens": tokens,
                            "ttft_ms": ((first or end) - start) * 1e3,
                            "gen_s": end - (first or end),
                        }
                    )
        return summarise(runs)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    path = str(smollm2_path())
    kwargs = {"rounds": args.rounds, "max_tokens": args.max_tokens, "threads": args.threads}
    local = in_process(path, **kwargs)
    remote = replica(path, **kwargs)
    print(
        json.dumps(
            {
                "benchmark": "serving_replica_vs_inprocess",
                "model": os.path.basename(path),
                "max_tokens": args.max_tokens,
                "threads": args.threads,
                "in_process": local,
                "replica": remote,
                "replica_vs_inprocess": round(remote["tokens_per_s"] / local["tokens_per_s"], 3),
                "added_ttft_ms_p50": round(remote["ttft_ms_p50"] - local["ttft_ms_p50"], 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
