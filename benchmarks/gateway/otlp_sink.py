"""An OTLP/HTTP receiver that accepts every export and keeps nothing: where the traced Converge
target (`--targets converge-traced`) sends its spans, so the benchmark measures what producing
and exporting them costs Converge, not what a collector costs.

    .venv/bin/python benchmarks/gateway/otlp_sink.py PORT

POST /v1/traces answers 200 with an empty ExportTraceServiceResponse (what a collector answers
when it took everything); GET /stats says how many exports and bytes arrived, GET /health/ready
answers once it listens.
"""

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

stats = {"exports": 0, "bytes": 0}
lock = threading.Lock()


class Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the exporter reuses its connection

    def do_POST(self) -> None:
        size = int(self.headers.get("content-length") or 0)
        self.rfile.read(size)
        with lock:
            stats["exports"] += 1
            stats["bytes"] += size
        self._answer(200, b"", "application/x-protobuf")

    def do_GET(self) -> None:
        if self.path == "/stats":
            with lock:
                body = json.dumps(stats).encode()
            self._answer(200, body, "application/json")
        else:
            self._answer(200, b"{}", "application/json")

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:  # quiet
        pass


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
