"""How /console is served: the files, the redirect, and the security headers on every answer."""

from __future__ import annotations

from converge.console.api import CONTENT_SECURITY_POLICY


async def test_the_console_is_served_with_a_strict_content_security_policy(committed_client):
    index = await committed_client.get("/console/")
    assert index.status_code == 200 and 'type="module"' in index.text
    assert index.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "script-src 'self'" in CONTENT_SECURITY_POLICY and "unsafe-inline" not in CONTENT_SECURITY_POLICY
    module = await committed_client.get("/console/pages/library.js")
    assert module.status_code == 200 and "javascript" in module.headers["content-type"]
    assert module.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    redirect = await committed_client.get("/console", follow_redirects=False)
    assert redirect.status_code == 308 and redirect.headers["location"] == "/console/"
    assert (await committed_client.get("/console/no-such-file.js")).status_code == 404
