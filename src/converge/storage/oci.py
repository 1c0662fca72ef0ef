"""Models as OCI artifacts: a thin async wrapper over `oras` for registry sync and the CLI.

oras is synchronous (requests), so every call runs in a worker thread. A fresh client per call
keeps oras' per-client auth state out of concurrent calls.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import os
import re
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import oras.client
import oras.defaults

_SCHEME = "oci://"
# Grammar from the OCI distribution spec; checked here so a bad reference fails fast and clearly.
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
T = TypeVar("T")


class OciError(Exception):
    """Base class for registry failures."""


class InvalidReference(OciError, ValueError):
    pass


@dataclass(frozen=True, slots=True)
class OciRef:
    registry: str  # host[:port]
    repository: str
    tag: str | None = None
    digest: str | None = None  # "sha256:<hex>"; wins over the tag when both are set

    @classmethod
    def parse(cls, ref: str) -> OciRef:
        """Parse `[oci://]host[:port]/repo/path[:tag][@sha256:hex]`; the tag defaults to latest."""
        rest = ref.removeprefix(_SCHEME)
        registry, sep, path = rest.partition("/")
        # Without an explicit host a name like "models/x" would silently mean Docker Hub.
        if not sep or not path or not ("." in registry or ":" in registry or registry == "localhost"):
            raise InvalidReference(f"expected host[:port]/repository[:tag], got {ref!r}")
        path, _, digest = path.partition("@")
        name, _, tag = path.rpartition(":") if ":" in path else (path, "", "")
        ref_obj = cls(registry=registry, repository=name, tag=tag or None, digest=digest or None)
        if not _REPOSITORY.match(name):
            raise InvalidReference(f"invalid repository name {name!r} in {ref!r}")
        if tag and not _TAG.match(tag):
            raise InvalidReference(f"invalid tag {tag!r} in {ref!r}")
        if digest and not _DIGEST.match(digest):
            raise InvalidReference(f"only sha256 digests are supported, got {digest!r}")
        return ref_obj if tag or digest else replace(ref_obj, tag="latest")

    @property
    def target(self) -> str:
        """The reference in the form oras expects (no scheme)."""
        base = f"{self.registry}/{self.repository}"
        return f"{base}@{self.digest}" if self.digest else f"{base}:{self.tag or 'latest'}"

    def with_tag(self, tag: str) -> OciRef:
        return replace(self, tag=tag, digest=None)

    def __str__(self) -> str:
        return _SCHEME + self.target


class OciClient:
    def __init__(self, *, insecure: bool | None = None) -> None:
        # None: plain HTTP only for loopback registries (tests, a local registry); True/False
        # force HTTP/HTTPS for every registry.
        self._insecure = insecure

    async def list_tags(self, repo_ref: str | OciRef) -> list[str]:
        ref = _as_ref(repo_ref)
        return await asyncio.to_thread(self._call, ref, lambda c: list(c.get_tags(ref.target)))

    async def manifest_digest(self, ref: str | OciRef) -> str:
        digest, _ = await asyncio.to_thread(self._manifest, _as_ref(ref))
        return digest

    async def push(self, ref: str | OciRef, files: Sequence[str | Path]) -> str:
        """Push regular files as one artifact, a layer each titled by its file name; returns the
        manifest digest."""
        return await asyncio.to_thread(self._push, _as_ref(ref), [Path(f) for f in files])

    async def pull(self, ref: str | OciRef, dest_dir: str | Path) -> list[Path]:
        """Download every layer into `dest_dir`, each checked against its manifest digest."""
        return await asyncio.to_thread(self._pull, _as_ref(ref), Path(dest_dir))

    def _pull(self, ref: OciRef, dest_dir: Path) -> list[Path]:
        digest, manifest = self._manifest(ref)
        # Pull by digest so a tag moved mid-pull cannot mix layers from two manifests.
        pinned = replace(ref, digest=digest)
        dest_dir.mkdir(parents=True, exist_ok=True)
        return [self._pull_layer(pinned, layer, dest_dir) for layer in manifest.get("layers", [])]

    def _pull_layer(self, ref: OciRef, layer: dict[str, Any], dest_dir: Path) -> Path:
        digest = layer["digest"]
        title = (layer.get("annotations") or {}).get(oras.defaults.annotation_title) or digest
        if "/" in title or title in (".", "..") or not _DIGEST.match(digest):
            raise OciError(f"refusing layer {title!r} ({digest}): unsafe name or unsupported digest")
        dest = dest_dir / title
        fd, part = tempfile.mkstemp(dir=dest_dir, prefix=f".{title}.", suffix=".part")
        os.close(fd)
        try:
            self._call(ref, lambda c: c.download_blob(ref.target, digest, part))
            # oras streams blobs to disk without checking them; registries can be wrong too.
            actual = _file_sha256(Path(part))
            if actual != digest:
                raise OciError(f"layer {title!r} digest mismatch: expected {digest}, got {actual}")
            if layer.get("mediaType") == oras.defaults.default_blob_dir_media_type:
                # oras pushes a directory as a tar.gz layer; unpack it like `oras pull` does.
                with tarfile.open(part, mode="r:gz") as tar:
                    tar.extractall(dest_dir, filter="data")
            else:
                os.replace(part, dest)
        finally:
            Path(part).unlink(missing_ok=True)
        return dest

    def _push(self, ref: OciRef, files: list[Path]) -> str:
        paths = [f.resolve() for f in files]
        for path in paths:
            if not path.is_file():
                raise OciError(f"only regular files can be pushed: {path}")
        if len({p.name for p in paths}) != len(paths):
            raise OciError("pushed files need distinct names: the name becomes the layer title")

        def push(client: oras.client.OrasClient) -> str:
            # oras refuses files outside the working directory unless validation is off; the
            # caller chose these paths, and a server process must not chdir to satisfy it.
            response = client.push(
                target=ref.target, files=[str(p) for p in paths], disable_path_validation=True, quiet=True
            )
            return response.headers.get("Docker-Content-Digest") or _sha256(response.request.body)

        return self._call(ref, push)

    def _manifest(self, ref: OciRef) -> tuple[str, dict[str, Any]]:
        def fetch(client: oras.client.OrasClient) -> bytes:
            container = client.get_container(ref.target)
            url = f"{client.prefix}://{container.manifest_url()}"
            headers = {"Accept": ", ".join(oras.defaults.default_manifest_accepted_media_types)}
            response = client.do_request(url, "GET", headers=headers)
            if response.status_code == 404:
                raise OciError(f"no manifest for {ref}")
            response.raise_for_status()
            return response.content

        body = self._call(ref, fetch)
        # The digest of a manifest is the sha256 of its exact bytes, whatever the registry says.
        digest = _sha256(body)
        if ref.digest and digest != ref.digest:
            raise OciError(f"manifest for {ref} has digest {digest}")
        manifest = json.loads(body)
        if "layers" not in manifest:  # e.g. a multi-platform index: nothing to pull directly
            raise OciError(f"{ref} is not an image manifest ({manifest.get('mediaType')})")
        return digest, manifest

    def _call(self, ref: OciRef, fn: Callable[[oras.client.OrasClient], T]) -> T:
        insecure = _is_loopback(ref.registry) if self._insecure is None else self._insecure
        client = oras.client.OrasClient(hostname=ref.registry, insecure=insecure)
        try:
            return fn(client)
        except OciError:
            raise
        except Exception as exc:  # oras reports registry errors as bare ValueError/requests errors
            raise OciError(f"registry call for {ref} failed: {exc}") from exc


def _is_loopback(registry: str) -> bool:
    host = urlsplit("//" + registry).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _as_ref(ref: str | OciRef) -> OciRef:
    return ref if isinstance(ref, OciRef) else OciRef.parse(ref)


def _sha256(data: bytes | str | None) -> str:
    raw = data.encode() if isinstance(data, str) else data or b""
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def _file_sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as src:
        while chunk := src.read(1024 * 1024):
            hasher.update(chunk)
    return "sha256:" + hasher.hexdigest()
