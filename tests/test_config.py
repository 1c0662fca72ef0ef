"""config.py: CONVERGE_* environment variables, refused unsafe settings, and CORS built from them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from converge.app import create_app
from converge.config import DEV_SECRET, Settings

PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sees only the CONVERGE_* variables it sets itself."""
    for name in list(os.environ):
        if name.startswith("CONVERGE_"):
            monkeypatch.delenv(name)


def test_production_refuses_the_development_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVERGE_ENV", "production")

    with pytest.raises(ValidationError, match="CONVERGE_AUTH__SECRET_KEY"):
        Settings()


def test_production_starts_with_its_own_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVERGE_ENV", "production")
    monkeypatch.setenv("CONVERGE_AUTH__SECRET_KEY", "9f2c" * 16)

    settings = Settings()

    assert settings.env == "production"
    assert settings.auth.secret_key.get_secret_value() == "9f2c" * 16


def test_dev_mode_accepts_the_development_secret() -> None:
    settings = Settings()

    assert settings.env == "dev"
    assert settings.auth.secret_key.get_secret_value() == DEV_SECRET


def test_the_fixed_top_level_names_are_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CONVERGE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CONVERGE_HOST", "0.0.0.0")
    monkeypatch.setenv("CONVERGE_PORT", "9123")
    monkeypatch.setenv("CONVERGE_DATABASE_URL", "postgresql://converge:pw@db.internal/converge")
    monkeypatch.setenv("CONVERGE_BOOTSTRAP_TOKEN", "a-bootstrap-token-of-32-characters")

    settings = Settings()

    assert settings.data_dir == tmp_path / "data"
    assert settings.pg_dir == tmp_path / "data" / "postgres"
    assert settings.artifacts_dir == tmp_path / "data" / "artifacts"
    assert (settings.host, settings.port) == ("0.0.0.0", 9123)
    assert settings.base_url == "http://0.0.0.0:9123"
    assert settings.database_url == "postgresql://converge:pw@db.internal/converge"
    assert settings.bootstrap_token is not None
    assert settings.bootstrap_token.get_secret_value() == "a-bootstrap-token-of-32-characters"


def test_data_dir_defaults_under_xdg_data_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))

    assert Settings().data_dir == tmp_path / "converge"


def test_nested_cors_origins_parse_from_a_json_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVERGE_SERVER__CORS_ORIGINS", '["http://a"]')

    assert Settings().server.cors_origins == ["http://a"]


def test_cors_is_off_by_default() -> None:
    assert Settings().server.cors_origins == []


def test_a_too_short_bootstrap_token_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVERGE_BOOTSTRAP_TOKEN", "x" * 15)

    with pytest.raises(ValidationError, match="CONVERGE_BOOTSTRAP_TOKEN must be at least 16 characters"):
        Settings()


def test_a_sixteen_character_bootstrap_token_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVERGE_BOOTSTRAP_TOKEN", "x" * 16)

    assert Settings().bootstrap_token is not None


async def test_an_allowed_origin_gets_cors_headers(tmp_path: Path) -> None:
    # CORS is answered by middleware before any route, so this app needs no lifespan (no database).
    app = create_app(
        Settings(data_dir=tmp_path, server={"cors_origins": ["http://ui.test"]}), on_first_key=None
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        preflight = await http.options("/projects", headers={"Origin": "http://ui.test", **PREFLIGHT})
        simple = await http.get("/health", headers={"Origin": "http://ui.test"})
        stranger = await http.options("/projects", headers={"Origin": "http://evil.test", **PREFLIGHT})

    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://ui.test"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    assert simple.headers["access-control-allow-origin"] == "http://ui.test"
    assert "access-control-allow-origin" not in stranger.headers


async def test_the_default_app_sends_no_cors_headers(app: Any) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        preflight = await http.options("/projects", headers={"Origin": "http://ui.test", **PREFLIGHT})
        simple = await http.get("/health", headers={"Origin": "http://ui.test"})

    assert "access-control-allow-origin" not in preflight.headers
    assert "access-control-allow-origin" not in simple.headers
