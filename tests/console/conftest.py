"""Fixtures for the console's browser tests: Debian's Chromium driven by Playwright (never a
downloaded browser), one browser for the session, one server on the session app, a fresh
browser context (its own sessionStorage) per test, and what went wrong on the page collected.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from support import LiveServer, free_port

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-quic",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "console"
VIEWPORT = {"width": 1280, "height": 800}
# Streams the console itself cancels (leaving the trust page, stopping a chat): not failures.
CANCELLED_STREAMS = re.compile(r"/sse/stream|/logs|/v1/chat/completions")

NO_CHROMIUM = (
    "console browser tests need Debian's Chromium at /usr/bin/chromium "
    "(apt-get install chromium, or `make system-deps` as root)"
)


@dataclass
class Console:
    """A browser tab on the console, with the console errors, page errors, failed requests and
    dialogs seen since it opened."""

    page: Any
    url: str
    errors: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def watch(self) -> None:
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.page.on("requestfailed", self._failed)
        self.page.on("response", lambda r: r.status >= 400 and self.failed.append(f"{r.status} {r.url}"))

        async def dialog(d: Any) -> None:
            self.dialogs.append(d.message)
            await d.dismiss()

        self.page.on("dialog", dialog)

    def _failed(self, request: Any) -> None:
        reason = request.failure or ""
        if "ERR_ABORTED" in reason and CANCELLED_STREAMS.search(request.url):
            return
        self.failed.append(f"{reason} {request.url}")

    async def open(self, route: str = "#/overview") -> None:
        """Go to a page and wait until it has rendered."""
        await self.page.goto(f"{self.url}/console/{route}")
        await self.rendered(route)

    async def rendered(self, route: str, timeout: float = 15_000) -> None:
        await self.page.wait_for_selector(f'body[data-rendered="{route}"]', state="attached", timeout=timeout)

    async def sign_in(self, token: str, route: str = "#/overview") -> None:
        await self.page.goto(f"{self.url}/console/{route}")
        await self.page.fill("#key", token)
        await self.page.click("#signin button[type=submit]")
        await self.rendered(route)

    async def sign_out(self) -> None:
        await self.page.get_by_role("button", name="Sign out").click()
        await self.page.wait_for_selector("#signin")

    async def screenshot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        await self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"))

    def assert_clean(self) -> None:
        assert not self.errors, f"console errors: {self.errors}"
        assert not self.failed, f"failed requests: {self.failed}"
        assert not self.dialogs, f"dialogs: {self.dialogs}"


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(NO_CHROMIUM)
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield chromium
        await chromium.close()


@pytest.fixture(scope="session")
async def console_server(app: Any) -> AsyncIterator[LiveServer]:
    """The session app on a loopback port (the `live_server` fixture's server, held for the
    session): the console and the API on one origin."""
    async with LiveServer(app, free_port()) as server:
        yield server


@pytest.fixture
async def console(browser: Any, console_server: LiveServer) -> AsyncIterator[Console]:
    context = await browser.new_context(viewport=VIEWPORT)
    page = await context.new_page()
    tab = Console(page=page, url=console_server.url)
    tab.watch()
    yield tab
    await context.close()
