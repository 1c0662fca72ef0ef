"""The `vllm` replica kind: vLLM's OpenAI server run as the replica's child, behind Converge's contract.

vLLM needs a CUDA GPU, which this machine does not have, so the process tests run the replica
against a stand-in at the program boundary: a `vllm.entrypoints.openai.api_server` module on
PYTHONPATH that takes vLLM's command line and speaks its HTTP surface (`/health`, the OpenAI
routes, `/metrics` in vLLM's metric names), and records what it was given. What the replica does
with a real vLLM is exactly this: start it, key it, wait for `/health`, forward, read `/metrics`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from converge.kit.net import free_port
from converge.serving import vllm
from converge.serving.__main__ import build_parser

STAND_IN = r"""
import argparse, json, os, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

parser = argparse.ArgumentParser()
for flag in ("--model", "--served-model-name", "--host", "--port", "--max-num-seqs", "--dtype",
             "--gpu-memory-utilization", "--tensor-parallel-size", "--max-model-len"):
    parser.add_argument(flag)
args, rest = parser.parse_known_args()
with open(os.environ["STAND_IN_RECORD"], "w") as f:
    json.dump({"argv": sys.argv[1:], "env": {k: v for k, v in os.environ.items()
               if k.startswith(("VLLM", "HF_", "TRANSFORMERS", "DO_NOT", "CUDA"))}}, f)
KEY = os.environ["VLLM_API_KEY"]
seen = []

class Handler(BaseHTTPRequestHandler):
    def _send(self, code, body, kind="application/json"):
        data = body.encode()
        self.send_response(code)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _keyed(self):
        if self.headers.get("authorization") != "Bearer " + KEY:
            self._send(401, json.dumps({"error": "bad key"}))
            return False
        return True

    def do_GET(self):
        if self.path == "/health":
            return self._send(200, "")
        if not self._keyed():
            return
        if self.path == "/metrics":
            return self._send(200, "\n".join([
                "# TYPE vllm:num_requests_running gauge",
                'vllm:num_requests_running{model_name="%s"} 3.0' % args.served_model_name,
                'vllm:num_requests_waiting{model_name="%s"} 2.0' % args.served_model_name,
                'vllm:kv_cache_usage_perc{model_name="%s"} 0.25' % args.served_model_name,
                'vllm:prompt_tokens_total{model_name="%s"} 120.0' % args.served_model_name,
                'vllm:generation_tokens_total{model_name="%s"} 300.0' % args.served_model_name,
                'vllm:prefix_cache_hits_total{model_name="%s"} 64.0' % args.served_model_name,
            ]) + "\n", "text/plain")
        self._send(404, "{}")

    def do_POST(self):
        if not self._keyed():
            return
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        seen.append(self.headers.get("x-client-secret"))
        if body["model"] != args.served_model_name:
            return self._send(404, json.dumps({"error": {"message": "no such model"}}))
        text = "echo: " + body["messages"][-1]["content"]
        answer = {"object": "chat.completion", "model": body["model"],
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
                  "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
        self._send(200, json.dumps(answer))

ThreadingHTTPServer((args.host, int(args.port)), Handler).serve_forever()
"""


@pytest.fixture
def stand_in(tmp_path: Path) -> Path:
    package = tmp_path / "site" / "vllm" / "entrypoints" / "openai"
    package.mkdir(parents=True)
    for folder in (package, package.parent, package.parent.parent):
        (folder / "__init__.py").write_text("")
    (package / "api_server.py").write_text(STAND_IN)
    return tmp_path / "site"


def options(**overrides: object) -> vllm.Options:
    return vllm.Options(**{"model_path": "/models/m", "model_name": "m", **overrides})  # type: ignore[arg-type]


def test_command_sets_every_knob_explicitly_on_loopback() -> None:
    argv = vllm.command(Path("/venv/bin/python"), options(max_num_seqs=16, max_model_len=4096,
                        max_num_batched_tokens=8192, tensor_parallel_size=2), port=8123)  # fmt: skip
    flags = dict(zip(argv[3::2], argv[4::2], strict=False))
    assert argv[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert flags["--host"] == "127.0.0.1" and flags["--port"] == "8123"
    assert (flags["--max-num-seqs"], flags["--tensor-parallel-size"]) == ("16", "2")
    assert argv[argv.index("--max-model-len") + 1] == "4096"
    assert argv[argv.index("--max-num-batched-tokens") + 1] == "8192"
    assert "--enable-prefix-caching" in argv and "--api-key" not in argv  # the key is in the environment
    off = vllm.command(Path("p"), options(prefix_caching=False), port=1)
    assert "--no-enable-prefix-caching" in off and "--max-model-len" not in off


def test_child_environment_is_offline_and_drops_vllms_own_settings() -> None:
    env = vllm.child_environment({"PATH": "/usr/bin", "VLLM_ATTENTION_BACKEND": "x", "VLLM_API_KEY": "k"})
    assert env["PATH"] == "/usr/bin" and "VLLM_ATTENTION_BACKEND" not in env and "VLLM_API_KEY" not in env
    assert env["HF_HUB_OFFLINE"] == "1" and env["VLLM_NO_USAGE_STATS"] == "1"


def test_tensor_parallel_defaults_to_the_gpus_the_replica_was_given() -> None:
    parser = build_parser()
    args = parser.parse_args(["vllm", "--model-path", "m", "--model-name", "m", "--port", "9000"])
    assert vllm.Options.from_args(args, environ={"CUDA_VISIBLE_DEVICES": "2,3"}).tensor_parallel_size == 2
    assert vllm.Options.from_args(args, environ={}).tensor_parallel_size == 1
    args.tensor_parallel_size = 4
    assert vllm.Options.from_args(args, environ={"CUDA_VISIBLE_DEVICES": "0"}).tensor_parallel_size == 4
    args.gpu_memory_utilization = 1.5
    with pytest.raises(SystemExit, match="gpu-memory-utilization"):
        vllm.Options.from_args(args, environ={})


def test_stats_read_vllms_metric_names() -> None:
    page = (
        "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
        'vllm:num_requests_running{engine="0",model_name="m"} 5.0\n'
        'vllm:num_requests_waiting{engine="0",model_name="m"} 7.0\n'
        'vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.5\n'
        'vllm:generation_tokens_total{engine="0",model_name="m"} 1000.0\n'
        'vllm:gpu_prefix_cache_hits_total{engine="0",model_name="m"} 10.0\n'
        'vllm:time_to_first_token_seconds_sum{model_name="m"} NaN\n'
    )
    assert vllm.metric_figures(page, max_num_seqs=32) == {
        "slots_total": 32, "slots_busy": 5, "requests_deferred": 7, "kv_cache_usage_ratio": 0.5,
        "tokens_generated_total": 1000, "prompt_tokens_cached_total": 10,
    }  # fmt: skip


def test_a_machine_without_vllm_gets_a_clear_error(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    env = {k: v for k, v in os.environ.items() if k != vllm.PYTHON_ENV}
    command = [sys.executable, "-m", "converge.serving", "vllm", "--model-path", str(model),
               "--model-name", "m", "--port", str(free_port()), "--vllm-python", str(tmp_path / "no-python")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env, check=False)  # noqa: S603
    assert done.returncode == 1
    assert "vLLM was not found" in done.stderr and "make vllm-venv" in done.stderr


@pytest.mark.slow
def test_replica_runs_vllm_keyed_forwards_openai_and_reports_its_engine(
    stand_in: Path, tmp_path: Path
) -> None:
    import psutil

    model = tmp_path / "model"
    model.mkdir()
    record = tmp_path / "record.json"
    port = free_port()
    env = os.environ | {"PYTHONPATH": str(stand_in), "STAND_IN_RECORD": str(record),
                        "CUDA_VISIBLE_DEVICES": "0,1", "VLLM_ATTENTION_BACKEND": "stray"}  # fmt: skip
    command = [sys.executable, "-m", "converge.serving", "vllm", "--model-path", str(model), "--model-name",
               "llama-8b", "--port", str(port), "--vllm-python", sys.executable, "--max-num-seqs", "8"]  # fmt: skip
    log = tmp_path / "replica.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)  # noqa: S603
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        given = json.loads(record.read_text())
        flags = dict(zip(given["argv"][::2], given["argv"][1::2], strict=False))
        assert flags["--served-model-name"] == "llama-8b" and flags["--host"] == "127.0.0.1"
        assert (flags["--max-num-seqs"], flags["--tensor-parallel-size"]) == ("8", "2")
        assert given["env"]["HF_HUB_OFFLINE"] == "1" and "VLLM_ATTENTION_BACKEND" not in given["env"]

        body = {"model": "llama-8b", "messages": [{"role": "user", "content": "hello"}]}
        answer = httpx.post(
            f"{url}/v1/chat/completions", json=body, headers={"authorization": "Bearer client"}
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == "echo: hello"
        assert httpx.get(f"{url}/metrics").status_code == 404  # only the OpenAI routes are forwarded

        stats = httpx.get(f"{url}/converge/stats").json()
        assert stats["engine"] == "vllm" and stats["kind"] == "vllm"
        assert (stats["slots_total"], stats["slots_busy"], stats["requests_deferred"]) == (8, 3, 2)
        assert stats["kv_cache_usage_ratio"] == 0.25 and stats["tokens_generated_total"] == 300

        (engine,) = [p for p in psutil.Process(proc.pid).children(recursive=True) if "api_server" in " ".join(p.cmdline())
                     or "vllm.entrypoints" in " ".join(p.cmdline())]  # fmt: skip
        engine.send_signal(signal.SIGKILL)  # the engine dies while serving: the replica ends too
        assert proc.wait(timeout=20) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
