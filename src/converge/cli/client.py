"""The CLI's only way in: the HTTP API, with a saved profile (URL + key).

Every command gets its client from `api(profile)` and talks through `Api`, which turns each way a
request can fail into one readable line on stderr and an exit code: 2 when the server cannot be
reached, 1 for anything else.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer
from rich.text import Text

from converge.cli.output import die

ProfileOpt = Annotated[str | None, typer.Option("--profile", help="Saved profile to use")]
YesOpt = Annotated[bool, typer.Option("--yes", help="Do not ask")]
# Uploads, URI registrations and source syncs do all their work (fetch, scan, inspect) before
# answering.
SLOW = httpx.Timeout(30.0, read=1800.0)


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(os.environ.get("CONVERGE_CLI_CONFIG", Path(base) / "converge" / "cli.json"))


@dataclass
class Profile:
    url: str
    key: str | None


def load_profiles() -> dict[str, Any]:
    path = config_path()
    if not path.exists():
        return {"current": None, "profiles": {}}
    return json.loads(path.read_text())


def save_profile(name: str, profile: Profile) -> Path:
    data = load_profiles()
    data["profiles"][name] = {"url": profile.url, "key": profile.key}
    data["current"] = name
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    # The file holds a credential: readable by its owner only, like a kubeconfig.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # O_CREAT's mode only applies to new files
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2)
    return path


def current_profile(name: str | None = None) -> Profile:
    env_url, env_key = os.environ.get("CONVERGE_URL"), os.environ.get("CONVERGE_API_KEY")
    data = load_profiles()
    chosen = data["profiles"].get(name or data.get("current") or "", {})
    url = env_url or chosen.get("url") or "http://127.0.0.1:8000"
    return Profile(url=url.rstrip("/"), key=env_key or chosen.get("key"))


def api(profile: str | None = None) -> Api:
    """A client for the saved profile `profile` (or the current one, or CONVERGE_URL/_API_KEY)."""
    return Api(current_profile(profile))


def is_uuid(ref: str) -> bool:
    try:
        uuid.UUID(ref)
    except ValueError:
        return False
    return True


def fail(resp: httpx.Response) -> NoReturn:
    """Exit 1 with the status and the server's own words (shown literally, not as markup)."""
    try:
        body = resp.json()
        detail = body.get("detail") or body.get("error", {}).get("message") or resp.text
    except (ValueError, AttributeError):  # not JSON, or JSON of another shape
        detail = resp.text
    die(Text.assemble((f"Error {resp.status_code}:", "red"), " ", str(detail)))


class Api:
    def __init__(self, profile: Profile, *, timeout: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {profile.key}"} if profile.key else {}
        self.http = httpx.Client(base_url=profile.url, headers=headers, timeout=timeout)

    def unreachable(self) -> NoReturn:
        hint = " - is `converge up` running?"
        die(Text.assemble((f"Cannot reach Converge at {self.http.base_url}", "red"), hint), code=2)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """The answer, whatever its status. Exits 2 when the server cannot be reached; other
        transport failures are raised, for a caller that can say more about them (see `send`)."""
        try:
            return self.http.request(method, path, **kwargs)
        except httpx.ConnectError:
            self.unreachable()

    def send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """The answer, whatever its status; exits with a readable line on any transport failure."""
        try:
            return self.request(method, path, **kwargs)
        except httpx.TimeoutException:
            die(f"The server did not answer {method} {path} in time")
        except httpx.HTTPError as exc:
            die(f"Request {method} {path} failed: {exc}")

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """The decoded answer (None when empty); exits 1 with the server's words on a 4xx/5xx."""
        resp = self.send(method, path, **kwargs)
        if resp.status_code >= 400:
            fail(resp)
        return resp.json() if resp.status_code != 204 and resp.content else None

    def paged(
        self, path: str, *, params: dict[str, Any] | None = None, limit: int | None = None
    ) -> Iterator[Any]:
        """Every item of a cursor-paginated collection (at most `limit`), fetching pages as needed."""
        params = dict(params or {})
        seen = 0
        while True:
            page = self.call("GET", path, params=params)
            for item in page["items"]:
                yield item
                seen += 1
                if limit is not None and seen >= limit:
                    return
            if not page.get("next_cursor"):
                return
            params["cursor"] = page["next_cursor"]

    def named(self, path: str, ref: str, *, params: dict[str, Any] | None = None) -> Any:
        """The item of a collection whose name (or id) is `ref`, or None."""
        for item in self.paged(path, params={"limit": 500, **(params or {})}):
            if ref in (item["name"], item["id"]):
                return item
        return None

    def lookup(self, path: str, ref: str) -> Any:
        """The object at `path` that `ref` names or identifies, or None when no name matches."""
        return self.call("GET", f"{path}/{ref}") if is_uuid(ref) else self.named(path, ref)

    @contextmanager
    def lines(self, path: str, *, params: dict[str, Any]) -> Iterator[Iterator[str]]:
        """A streamed text answer (a log), line by line, for as long as the server sends it."""
        try:
            with self.http.stream("GET", path, params=params, timeout=None) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    fail(resp)
                yield resp.iter_lines()
        except httpx.ConnectError:
            self.unreachable()

    def delete(self, path: str, *, ask: str | None) -> None:
        """DELETE `path`, once the user answers yes to `ask` (None: they said --yes already)."""
        if ask is not None:
            typer.confirm(ask, abort=True)
        self.call("DELETE", path)

    def project_id(self, ref: str) -> str:
        """Accept a project id or name."""
        if is_uuid(ref):
            return str(uuid.UUID(ref))
        project = self.named("/projects", ref)
        if project is None:
            die(f"No project named '{ref}' is visible to you")
        return str(project["id"])
