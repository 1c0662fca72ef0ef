"""Upload a large artifact through a real `converge up` and watch the server's memory.

Prints one JSON object: the server's resident memory before, at peak during, and after a
streamed upload of SIZE_MB (default 200), with the throughput. The upload is generated on the
fly, so the client holds one chunk at a time too.

    .venv/bin/python benchmarks/control_plane/upload_memory.py [SIZE_MB]
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import psutil

TOKEN = "bench-bootstrap-token-0123456789"
CHUNK = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(size_mb: int) -> dict:
    data_dir = tempfile.mkdtemp(prefix="cvg-bench-", dir="/tmp")
    port = free_port()
    env = {
        **os.environ,
        "CONVERGE_DATA_DIR": data_dir,
        "CONVERGE_PORT": str(port),
        "CONVERGE_BOOTSTRAP_TOKEN": TOKEN,
        "CONVERGE_LIBRARY__SEED_CATALOGUE": "false",
    }
    exe = os.path.join(os.path.dirname(sys.executable), "converge")
    server = subprocess.Popen([exe, "up"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    try:
        with httpx.Client(base_url=base, headers=headers, timeout=600) as http:
            for _ in range(300):
                try:
                    if http.get("/readiness").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            proc = psutil.Process(server.pid)
            model = http.post("/models", json={"name": "bench-upload"}).json()
            baseline = proc.memory_info().rss
            peak = baseline
            stop = threading.Event()

            def sample() -> None:
                nonlocal peak
                while not stop.is_set():
                    peak = max(peak, proc.memory_info().rss)
                    time.sleep(0.02)

            sampler = threading.Thread(target=sample)
            sampler.start()
            block = os.urandom(CHUNK)

            def body():
                for i in range(size_mb):
                    yield i.to_bytes(8, "big") + block[8:]

            start = time.perf_counter()
            resp = http.post(
                f"/models/{model['id']}/versions/upload",
                params={"version": "v1", "filename": "big.bin"},
                content=body(),
                headers={"content-type": "application/octet-stream", "content-length": str(size_mb * CHUNK)},
            )
            elapsed = time.perf_counter() - start
            stop.set()
            sampler.join()
            after = proc.memory_info().rss
            version = resp.json()
        return {
            "benchmark": "library_upload_memory",
            "upload_mb": size_mb,
            "status": resp.status_code,
            "version_state": version.get("state"),
            "sha256": version.get("artifact_sha256"),
            "seconds": round(elapsed, 2),
            "mb_per_s": round(size_mb / elapsed, 1),
            "server_rss_mb": {
                "before": round(baseline / 2**20, 1),
                "peak": round(peak / 2**20, 1),
                "after": round(after / 2**20, 1),
                "peak_minus_before": round((peak - baseline) / 2**20, 1),
            },
        }
    finally:
        server.terminate()
        server.wait(timeout=30)
        subprocess.run(["rm", "-rf", data_dir], check=False)


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else 200), indent=2))
