"""The CLI's only way in: the HTTP API, with a saved profile (URL + key)."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import typer
from rich.console import Console
from rich.markup import escape

err = Console(stderr=True)


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


class Api:
    def __init__(self, profile: Profile, *, timeout: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {profile.key}"} if profile.key else {}
        self.http = httpx.Client(base_url=profile.url, headers=headers, timeout=timeout)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self.http.request(method, path, **kwargs)
        except httpx.ConnectError:
            err.print(f"[red]Cannot reach Converge at {self.http.base_url}[/] - is `converge up` running?")
            raise typer.Exit(2) from None

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = self.request(method, path, **kwargs)
        if resp.status_code >= 400:
            fail(resp)
        if resp.status_code == 204 or not resp.content:
            return None
        return resp.json()

    def paged(
        self, path: str, *, params: dict[str, Any] | None = None, limit: int | None = None
    ) -> Iterator[Any]:
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

    def project_id(self, ref: str) -> str:
        """Accept a project id or name."""
        try:
            return str(uuid.UUID(ref))
        except ValueError:
            pass
        for project in self.paged("/projects", params={"limit": 500}):
            if project["name"] == ref:
                return str(project["id"])
        err.print(f"[red]No project named '{ref}' is visible to you[/]")
        raise typer.Exit(1)


def fail(resp: httpx.Response) -> None:
    try:
        body = resp.json()
        detail = body.get("detail") or body.get("error", {}).get("message") or resp.text
    except ValueError:
        detail = resp.text
    err.print(f"[red]Error {resp.status_code}:[/] {escape(str(detail))}")
    raise typer.Exit(1)
