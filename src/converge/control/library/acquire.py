"""Bring an artifact into the content-addressed store, from an upload or a URI.

Every path ends the same way: the bytes are in the artifact store under their sha256 (stored
once however often they arrive) and a verified copy is materialised in the local cache, where
inspection and scans read it and where local replicas later load it from.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import obstore
from obstore.store import S3Store

from converge.config import Settings
from converge.errors import BadRequest, Forbidden, Unprocessable
from converge.storage.artifacts import ArtifactStore, ArtifactTooLarge, StoredBlob, UnsafePath
from converge.storage.oci import OciClient, OciRef

# Server paths an admin may not register, whatever the permissions: the operating system's own
# trees (configuration, binaries, kernel and device interfaces, runtime state, home of root).
# A model belongs in a directory of its own (/srv, /opt, /data, /mnt, /home, /tmp, ...).
SYSTEM_PREFIXES = tuple(
    Path(p)
    for p in (
        "/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/lost+found",
        "/proc", "/root", "/run", "/sbin", "/snap", "/sys", "/usr", "/var",
    )
)  # fmt: skip


@dataclass
class Acquired:
    blob: StoredBlob
    is_directory: bool
    filename: str
    local_path: Path
    kind: str  # upload | path | s3 | oci | mlflow | builtin | sync
    uri: str
    details: dict[str, Any] = field(default_factory=dict)  # more provenance (MLflow: run id, model URI)


def artifact_store(settings: Settings) -> ArtifactStore:
    lib = settings.library
    if lib.artifact_store_url and lib.artifact_store_url.startswith("s3://"):
        parsed = urlparse(lib.artifact_store_url)
        return ArtifactStore.s3(
            bucket=parsed.netloc,
            prefix=parsed.path.strip("/") or None,
            endpoint=lib.s3_endpoint,
            region=lib.s3_region,
            access_key_id=lib.s3_access_key_id,
            secret_access_key=lib.s3_secret_access_key.get_secret_value()
            if lib.s3_secret_access_key
            else None,
            staging_dir=settings.data_dir / "staging",
        )
    return ArtifactStore.local(lib.artifact_store_url or settings.artifacts_dir)


def cache_dir(settings: Settings) -> Path:
    return settings.data_dir / "cache" / "artifacts"


async def _materialise(
    store: ArtifactStore, settings: Settings, blob: StoredBlob, *, kind: str, uri: str, filename: str
) -> Acquired:
    is_dir = await store.is_directory(blob.sha256)
    local = await store.fetch_to(blob.sha256, cache_dir(settings))
    return Acquired(blob=blob, is_directory=is_dir, filename=filename, local_path=local, kind=kind, uri=uri)


async def from_stream(
    store: ArtifactStore,
    settings: Settings,
    chunks: AsyncIterator[bytes],
    *,
    filename: str,
    expected_sha256: str | None,
) -> Acquired:
    blob = await store.put_stream(
        chunks, expected_sha256=expected_sha256, max_bytes=settings.library.max_upload_bytes
    )
    return await _materialise(
        store, settings, blob, kind="upload", uri=f"upload:{filename}", filename=filename
    )


async def from_path(
    store: ArtifactStore, settings: Settings, path: Path, *, expected_sha256: str | None, kind: str = "path"
) -> Acquired:
    if not await asyncio.to_thread(os.path.lexists, path):
        raise BadRequest(f"No file or directory at {path} on the server")
    limit = settings.library.max_upload_bytes
    # put_* survey the path first (file types, linked directories, total size): a refusal
    # comes before any byte is copied.
    try:
        if await asyncio.to_thread(path.is_dir):
            blob = await store.put_directory(path, expected_sha256=expected_sha256, max_bytes=limit)
        else:
            blob = await store.put_file(path, expected_sha256=expected_sha256, max_bytes=limit)
    except UnsafePath as exc:
        raise Unprocessable(f"Cannot register {path}: {exc}; nothing was copied") from exc
    except ArtifactTooLarge as exc:
        raise Unprocessable(
            f"{path} holds more than {exc.limit} bytes (library.max_upload_bytes); nothing was registered"
        ) from exc
    return await _materialise(store, settings, blob, kind=kind, uri=str(path), filename=path.name)


def server_path(uri: str, settings: Settings) -> Path:
    """The path a `file://` or bare-path URI names, if an admin may register it: absolute, not
    the root, not in a system directory and not inside (or above) Converge's own data."""
    parsed = urlparse(uri)
    if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
        raise BadRequest(f"A file:// URI names a path on this server, not on host '{parsed.netloc}'")
    raw = parsed.path if parsed.scheme == "file" else uri
    path = Path(raw)
    if not path.is_absolute():
        raise BadRequest("A server path must be absolute")
    if ".." in path.parts:
        raise BadRequest("A server path must not contain '..'")
    # The real location decides (a link from /srv into /etc is still /etc).
    real = Path(os.path.realpath(path))
    data = Path(os.path.realpath(settings.data_dir))
    if real == Path(real.anchor):
        raise Forbidden("The filesystem root cannot be registered: name the model's own file or directory")
    if any(real == p or real.is_relative_to(p) for p in SYSTEM_PREFIXES):
        raise Forbidden(
            f"{path} is in a system directory ({', '.join(str(p) for p in SYSTEM_PREFIXES)}); "
            "copy the model to a directory of its own, or upload it"
        )
    if real.is_relative_to(data) or data.is_relative_to(real):
        raise Forbidden(f"{path} is (or holds) Converge's own data directory and cannot be registered")
    return path


async def from_s3(
    store: ArtifactStore,
    settings: Settings,
    uri: str,
    *,
    expected_sha256: str | None,
    options: dict[str, Any],
) -> Acquired:
    parsed = urlparse(uri)
    key = parsed.path.lstrip("/")
    if not parsed.netloc or not key:
        raise BadRequest(f"S3 URI must look like s3://bucket/key, got {uri}")
    s3 = s3_store(settings, bucket=parsed.netloc, options=options)
    try:
        result = await obstore.get_async(s3, key)
    except FileNotFoundError as exc:
        raise BadRequest(f"No object at {uri}") from exc

    async def chunks() -> AsyncIterator[bytes]:
        async for chunk in result.stream():
            yield bytes(chunk)

    blob = await store.put_stream(
        chunks(), expected_sha256=expected_sha256, max_bytes=settings.library.max_upload_bytes
    )
    return await _materialise(store, settings, blob, kind="s3", uri=uri, filename=Path(key).name)


def s3_store(settings: Settings, *, bucket: str, options: dict[str, Any]) -> S3Store:
    lib = settings.library
    endpoint = options.get("endpoint") or lib.s3_endpoint
    secret = options.get("secret_access_key") or (
        lib.s3_secret_access_key.get_secret_value() if lib.s3_secret_access_key else None
    )
    config: dict[str, Any] = {"region": options.get("region") or lib.s3_region}
    if endpoint:
        config["endpoint"] = endpoint
    if key_id := options.get("access_key_id") or lib.s3_access_key_id:
        config["access_key_id"] = key_id
        config["secret_access_key"] = secret
    else:
        config["skip_signature"] = True
    client_options = {"allow_http": True} if str(endpoint or "").startswith("http://") else None
    # obstore types config/client_options as TypedDicts; these dicts hold exactly their keys.
    return S3Store(bucket, config=config, client_options=client_options)  # type: ignore[arg-type]


async def from_oci(
    store: ArtifactStore,
    settings: Settings,
    uri: str,
    *,
    expected_sha256: str | None,
    insecure: bool | None = None,
) -> Acquired:
    ref = OciRef.parse(uri)
    work = Path(tempfile.mkdtemp(prefix="oci-", dir=_tmp(settings)))
    try:
        files = await OciClient(insecure=insecure).pull(ref, work)
        if len(files) == 1 and files[0].is_file():
            blob = await store.put_file(files[0], expected_sha256=expected_sha256)
            name = files[0].name
        else:
            blob = await store.put_directory(work, expected_sha256=expected_sha256)
            name = ref.repository.rsplit("/", 1)[-1]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return await _materialise(store, settings, blob, kind="oci", uri=uri, filename=name)


async def from_mlflow(
    store: ArtifactStore,
    settings: Settings,
    uri: str,
    *,
    expected_sha256: str | None,
    options: dict[str, Any],
) -> Acquired:
    """A version registered in MLflow (`mlflow://models/NAME/VERSION`), from the tracking server
    of the source it belongs to, else the configured one; its folder is stored like any other."""
    from converge.control.experiments import registry

    ref = registry.ModelRef.parse(uri)
    tracking_uri = options.get("tracking_uri") or settings.mlflow.tracking_uri
    if not tracking_uri:
        raise BadRequest(
            f"No MLflow server is known for {uri}: an admin registers one as a source (kind mlflow, "
            "options.tracking_uri), or sets CONVERGE_MLFLOW__TRACKING_URI"
        )
    work = Path(tempfile.mkdtemp(prefix="mlflow-", dir=_tmp(settings)))
    try:
        folder, registered = await registry.download(
            tracking_uri,
            ref,
            dest=work,
            timeout_s=settings.mlflow.download_timeout_s,
            request_timeout_s=settings.mlflow.timeout_s,
        )
        blob = await store.put_directory(
            folder, expected_sha256=expected_sha256, max_bytes=settings.library.max_upload_bytes
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    acquired = await _materialise(store, settings, blob, kind="mlflow", uri=uri, filename=ref.name)
    acquired.details = {**registered.provenance(tracking_uri), "artifact_sha256": blob.sha256}
    return acquired


def _tmp(settings: Settings) -> Path:
    path = settings.data_dir / "tmp"
    path.mkdir(parents=True, exist_ok=True)
    return path


async def from_uri(
    store: ArtifactStore,
    settings: Settings,
    uri: str,
    *,
    expected_sha256: str | None,
    may_read_server_paths: bool,
    options: dict[str, Any] | None = None,
) -> Acquired:
    scheme = urlparse(uri).scheme
    try:
        if scheme == "s3":
            return await from_s3(store, settings, uri, expected_sha256=expected_sha256, options=options or {})
        if scheme == "oci":
            return await from_oci(
                store,
                settings,
                uri,
                expected_sha256=expected_sha256,
                insecure=(options or {}).get("insecure"),
            )
        if scheme == "mlflow":
            return await from_mlflow(
                store, settings, uri, expected_sha256=expected_sha256, options=options or {}
            )
    except ArtifactTooLarge as exc:
        raise Unprocessable(
            f"The artifact at {uri} exceeds {exc.limit} bytes (library.max_upload_bytes); nothing was registered"
        ) from exc
    except UnsafePath as exc:
        raise Unprocessable(f"Cannot register {uri}: {exc}; nothing was registered") from exc
    if scheme in ("", "file"):
        if not may_read_server_paths:
            raise Forbidden("Registering a path on the server's disk is for admins; upload the file instead")
        path = await asyncio.to_thread(server_path, uri, settings)
        return await from_path(store, settings, path, expected_sha256=expected_sha256)
    raise BadRequest(
        f"Unsupported URI scheme '{scheme}': use s3://, oci://, mlflow:// or an absolute server path"
    )
