"""`converge rag` and `converge chat` against a live server: a RAG model is created, listed,
shown and changed from the CLI, and one `chat --message` turn prints the streamed answer with
the citation it stood on, then continues the same session."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from rag_models_support import QUESTION, cleanup, rag_world, unique
from rag_support import MiniLM, minilm, minilm_replica
from rich.console import Console
from scripted_llm import ScriptedLlm
from typer.testing import CliRunner, Result

from converge.cli import output
from converge.cli.main import app as cli_app

__all__ = ["minilm", "minilm_replica"]  # the fixtures


async def _run(env: dict[str, str], *args: str) -> Result:
    # The CLI's client is synchronous and the server runs on this loop: a worker thread.
    result = await asyncio.to_thread(CliRunner().invoke, cli_app, list(args), env=env)
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result


async def test_rag_and_chat_commands(
    app: Any,
    committed_client: Any,
    minilm: MiniLM,
    live_server: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(output, "console", Console(width=250))
    monkeypatch.setattr(output, "err", Console(stderr=True, width=250))
    client = committed_client
    async with ScriptedLlm() as llm, live_server() as server:
        world = await rag_world(app, client, minilm, llm)
        env = {
            "CONVERGE_CLI_CONFIG": str(tmp_path / "cli.json"),
            "CONVERGE_URL": server.url,
            "CONVERGE_API_KEY": world.token,
            "NO_COLOR": "1",
        }
        project = world.project_id
        name = unique("rag")
        try:
            made = await _run(
                env, "rag", "create", name, "-p", project, "--chat", world.chat["name"], "--kb", world.kb["name"],
                "--k", "1", "--json",
            )  # fmt: skip
            assert json.loads(made.output)["spec"]["retrieval"]["k"] == 1
            listed = await _run(env, "rag", "list", "-p", project)
            assert name in listed.output and world.kb["name"] in listed.output
            changed = await _run(env, "rag", "update", name, "-p", project, "--min-score", "0.2", "--json")
            assert json.loads(changed.output)["revision"] == 2
            shown = await _run(env, "rag", "show", name, "-p", project)
            assert '"min_score": 0.2' in shown.output

            llm.reply("Create a new key, then revoke the old one [1].")
            answered = await _run(env, "chat", name, "-p", project, "--message", QUESTION)
            assert "Create a new key, then revoke the old one [1]." in answered.output
            assert "[1] keys (keys.md)" in answered.output  # the citation, after the answer
            session_id = answered.output.strip().rsplit("session ", 1)[1].split()[0]

            llm.reply("That is all.")
            more = await _run(env, "chat", "--session", session_id, "--message", "Anything else?", "--json")
            assert json.loads(more.output)["session_id"] == session_id
            messages = await client.get(f"/chat/sessions/{session_id}/messages", headers=world.key)
            assert [m["content"] for m in messages.json()["items"]][-1] == "That is all."

            await _run(env, "rag", "delete", name, "-p", project, "--yes")
            assert name not in (await _run(env, "rag", "list", "-p", project)).output
        finally:
            await cleanup(client, world)
