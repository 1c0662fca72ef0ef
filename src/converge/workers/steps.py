"""The steps of a build as a command: what a build Job's containers run on a cluster.

    python -m converge.workers.steps fetch|verify|scan|benchmark ...

Each step is the code the local build runner (`workers/builds.py`) and the library use, with
no database (pods in project namespaces reach only the artifact store): `fetch` fills the
digest-keyed cache through `ArtifactStore.fetch_to` (verified while written, a cached copy
re-hashed), `verify` re-hashes what the cache holds, `scan` is the library's scan, and
`benchmark` measures the smoke-loaded server sidecar with `control/builds/benchmark.py`.

Every step ends with one JSON line, `{"step", "ok", ...}`: on stdout when it succeeds, on stderr
with `"error"` when it fails (exit code 1), and also in the file `--results` names (the
container's termination message, which the Kubernetes build runner reads). Arguments that
cannot be parsed exit with code 2, as argparse does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
from obstore.store import LocalStore

from converge.control.builds.benchmark import benchmark_server
from converge.control.library.inspection import inspect_artifact, scan_artifact
from converge.storage.artifacts import (
    ArtifactError,
    ArtifactNotFound,
    ArtifactStore,
    DigestMismatch,
    digest_of,
    normalize_digest,
    survey,
)

SERVERS = ("llama-cpp", "embeddings", "v2", "vllm")
# A termination message is at most 4096 bytes, and one taken from the log tail 2048: the
# error line must fit whole, or the runner could not read it back.
MAX_ERROR_CHARS = 1500
EXIT_FAILED = 1

Result = dict[str, Any]


class StepFailed(Exception):
    """A step's failure with a message a person can act on (shown as the build's reason)."""


# --- fetch -------------------------------------------------------------------------------------


def store_for(uri: str, sha256: str) -> ArtifactStore:
    """The artifact store that keeps `uri`, the content address of `sha256` in it
    (`<base>/sha256/<2 hex>/<digest>`, base `s3://bucket[/prefix]` or `file:///root`).

    S3 settings come from the environment, by the names Converge itself reads
    (`CONVERGE_LIBRARY__S3_ENDPOINT`, `..._REGION`, `..._ACCESS_KEY_ID`, `..._SECRET_ACCESS_KEY`),
    else the AWS ones (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, ...), else the
    pod's workload identity."""
    digest = normalize_digest(sha256)
    suffix = "/" + ArtifactStore.object_key(digest)
    if not uri.endswith(suffix):
        raise StepFailed(f"--uri {uri} is not the content address of {digest} (it must end in {suffix})")
    base = urlparse(uri[: -len(suffix)])
    if base.scheme == "s3":
        if not base.netloc:
            raise StepFailed(f"--uri {uri} names no bucket (s3://bucket/prefix/...)")
        env = os.environ.get
        return ArtifactStore.s3(
            bucket=base.netloc,
            prefix=base.path.strip("/") or None,
            endpoint=env("CONVERGE_LIBRARY__S3_ENDPOINT") or env("AWS_ENDPOINT_URL") or env("AWS_ENDPOINT"),
            region=env("CONVERGE_LIBRARY__S3_REGION")
            or env("AWS_REGION")
            or env("AWS_DEFAULT_REGION")
            or "us-east-1",
            access_key_id=env("CONVERGE_LIBRARY__S3_ACCESS_KEY_ID"),
            secret_access_key=env("CONVERGE_LIBRARY__S3_SECRET_ACCESS_KEY"),
        )
    if base.scheme == "file":
        root = Path(base.path)
        if not root.is_dir():
            raise StepFailed(f"the artifact store {root} does not exist or is not a directory")
        return ArtifactStore(LocalStore(root), staging_dir=root / ".staging", local_root=root)
    raise StepFailed(
        f"--uri {uri}: the artifact store must be s3:// or file://, not {base.scheme or 'a path'}"
    )


async def fetch(*, uri: str, sha256: str, cache_dir: Path) -> Result:
    digest = normalize_digest(sha256)
    store = store_for(uri, digest)
    dest = cache_dir / digest
    before = _inode(dest)
    t0 = time.perf_counter()
    try:
        local = await store.fetch_to(digest, cache_dir)
    except ArtifactNotFound as exc:
        raise StepFailed(f"the artifact store has no artifact {digest} ({uri})") from exc
    except DigestMismatch as exc:
        raise StepFailed(f"the artifact store's copy of {digest} is corrupt: {exc}") from exc
    except PermissionError as exc:
        raise StepFailed(f"cannot write the artifact cache {cache_dir}: {exc.strerror or exc}") from exc
    found = await asyncio.to_thread(survey, local)
    return {
        "path": str(local),
        "sha256": digest,
        "bytes": found.size_bytes,
        "directory": found.is_directory,
        "reused": before is not None and before == _inode(local),  # the node's cached copy matched
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _inode(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_ctime_ns  # a freed inode number is soon reused


# --- verify and scan ---------------------------------------------------------------------------


async def verify(*, sha256: str, path: Path) -> Result:
    digest = normalize_digest(sha256)
    if not path.exists():
        raise StepFailed(f"no artifact at {path}: the fetch step did not put {digest} in the cache")
    t0 = time.perf_counter()
    try:
        actual = await digest_of(path)
    except (ArtifactError, OSError) as exc:
        raise StepFailed(f"cannot read the artifact at {path}: {exc}") from exc
    if actual != digest:
        raise StepFailed(
            f"{path} is not the approved artifact: {DigestMismatch(digest, actual)} "
            "(the cached copy was changed after it was fetched)"
        )
    return {"path": str(path), "sha256": digest, "seconds": round(time.perf_counter() - t0, 3)}


def scan(*, format: str, path: Path) -> Result:
    """The library's scan of the code paths the files carry (pickles against the allow-list);
    a build refuses to load what it finds unsafe or cannot vouch for."""
    if not path.exists():
        raise StepFailed(f"no artifact at {path}: the fetch step did not fill the cache")
    result = scan_artifact(path)
    try:
        found = inspect_artifact(path).format
    except (ValueError, OSError):
        found = "unknown"
    if result.status in ("unsafe", "error"):
        details = "; ".join(f"{f.file}: {f.message}" for f in result.findings[:5])
        more = f" (and {len(result.findings) - 5} more)" if len(result.findings) > 5 else ""
        verdict = "unsafe" if result.status == "unsafe" else "could not be scanned"
        raise StepFailed(f"the {format} artifact is {verdict}: {details}{more}")
    return {
        "path": str(path),
        "format": format,
        "inspected_format": found,
        "status": result.status,
        "scanner": result.scanner,
        "scanner_version": result.scanner_version,
        "scanned_files": len(result.scanned_files),
    }


# --- benchmark ---------------------------------------------------------------------------------


async def wait_ready(base_url: str, *, server: str, timeout_s: float) -> None:
    """The sidecar's startup probe has passed before this container starts; this check only
    gives a clear message where it has not (or the server went away since)."""
    path = "/health" if server == "vllm" else "/health/ready"
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(base_url=base_url, timeout=5) as http:
        while True:
            with contextlib.suppress(httpx.TransportError):
                if (await http.get(path)).status_code == 200:
                    return
            if time.monotonic() >= deadline:
                raise StepFailed(f"the {server} server at {base_url} was not ready within {timeout_s:g}s")
            await asyncio.sleep(0.5)


async def benchmark(
    *,
    server: str,
    model_name: str,
    base_url: str,
    inputs: list[dict[str, Any]] | None,
    ready_timeout_s: float,
) -> Result:
    await wait_ready(base_url, server=server, timeout_s=ready_timeout_s)
    try:
        figures = await benchmark_server(server, base_url, model_name, inputs=inputs)
    except httpx.HTTPStatusError as exc:
        body = exc.response.text[:300]
        raise StepFailed(f"the server answered {exc.response.status_code} to the benchmark: {body}") from exc
    except httpx.TransportError as exc:
        raise StepFailed(f"the server went away during the benchmark: {type(exc).__name__}: {exc}") from exc
    return {"results": figures}


# --- the command -------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="python -m converge.workers.steps",
        description="One step of a Converge build, as a build Job's container runs it. Each step "
        "prints one JSON line at the end ({step, ok, ...}; {error} when it fails, exit code 1) and "
        "writes the same line to --results when given (the container's termination message).",
    )
    steps = top.add_subparsers(dest="step", required=True, metavar="STEP")

    def step(name: str, help: str) -> argparse.ArgumentParser:
        sub = steps.add_parser(name, help=help, description=help)
        sub.add_argument(
            "--results", type=Path, help="also write the JSON result here (e.g. /dev/termination-log)"
        )
        return sub

    f = step("fetch", "Fill the digest-keyed cache with the artifact, verified while it is written")
    f.add_argument(
        "--uri", required=True, help="the artifact's content address in the store: s3://... or file://..."
    )
    f.add_argument("--sha256", required=True, help="the artifact's digest (64 hex digits)")
    f.add_argument(
        "--cache-dir", required=True, type=Path, help="the cache; the artifact goes to CACHE_DIR/<sha256>"
    )

    v = step("verify", "Check that the cached artifact still has its digest")
    v.add_argument("--sha256", required=True, help="the digest the artifact must have")
    v.add_argument("--path", required=True, type=Path, help="the cached artifact (a file or a folder)")

    s = step("scan", "Scan the artifact's files as the library does; fail on what is unsafe")
    s.add_argument("--format", required=True, help="the format the library recorded (gguf, onnx, ...)")
    s.add_argument("--path", required=True, type=Path, help="the cached artifact (a file or a folder)")

    b = step("benchmark", "Benchmark the smoke-loaded server and report its figures")
    b.add_argument("--server", required=True, choices=SERVERS, help="the server the sidecar runs")
    b.add_argument("--model-name", required=True, help="the name the server serves the model under")
    b.add_argument("--base-url", required=True, help="the server, e.g. http://127.0.0.1:8080")
    b.add_argument(
        "--inputs",
        type=json.loads,
        help="V2 only: the inspection's inputs as JSON ([{name, dtype, shape}]), used when the "
        "server declares none",
    )
    b.add_argument("--ready-timeout-s", type=float, default=60.0, help="how long to wait for /health/ready")
    return top


def _run(args: argparse.Namespace) -> Coroutine[Any, Any, Result]:
    runs: dict[str, Callable[[], Coroutine[Any, Any, Result]]] = {
        "fetch": lambda: fetch(uri=args.uri, sha256=args.sha256, cache_dir=args.cache_dir),
        "verify": lambda: verify(sha256=args.sha256, path=args.path),
        "scan": lambda: asyncio.to_thread(scan, format=args.format, path=args.path),
        "benchmark": lambda: benchmark(
            server=args.server,
            model_name=args.model_name,
            base_url=args.base_url,
            inputs=args.inputs,
            ready_timeout_s=args.ready_timeout_s,
        ),
    }
    return runs[args.step]()


def error_message(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, StepFailed) else f"{type(exc).__name__}: {exc}"
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        record: Result = {"step": args.step, "ok": True, **asyncio.run(_run(args))}
        stream, code = sys.stdout, 0
    except Exception as exc:  # every failure becomes the step's one clear line
        record = {"step": args.step, "ok": False, "error": error_message(exc)}
        stream, code = sys.stderr, EXIT_FAILED
    line = json.dumps(record, separators=(",", ":"), default=str)
    if args.results is not None:
        try:
            args.results.write_text(line + "\n")
        except OSError as exc:  # the line still reaches the log, where the runner looks next
            print(f"cannot write {args.results}: {exc}", file=sys.stderr)
    sys.stdout.flush()
    print(line, file=stream, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
