"""`converge chat [MODEL]`: a conversation with a deployment, RAG model or agent, streamed, with
the citations and tool calls of each answer shown after it. Every turn is a `/chat` session
turn, so it is recorded (see `--session` to continue one)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Annotated, Any

import httpx
import typer
from rich.text import Text

from converge.cli import output
from converge.cli.client import Api, ProfileOpt, api, fail
from converge.cli.output import die, echo, note

EXIT = frozenset({"/exit", "/quit"})


def _events(resp: httpx.Response) -> Iterator[dict[str, Any]]:
    for line in resp.iter_lines():
        if line.startswith("data: ") and line[6:].strip() != "[DONE]":
            yield json.loads(line[6:])


def _turn(client: Api, *, body: dict[str, Any], params: dict[str, Any], show: bool) -> dict[str, Any]:
    """One streamed turn: the content printed as it comes; the last chunk's `converge` field."""
    extra: dict[str, Any] = {}
    try:
        with client.http.stream("POST", "/chat", params=params, json=body, timeout=None) as resp:
            if resp.status_code >= 400:
                resp.read()
                fail(resp)
            for event in _events(resp):
                if "error" in event:
                    die(Text.assemble(("Error:", "red"), " ", str(event["error"].get("message"))))
                for choice in event.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content")
                    if piece and show:
                        output.console.print(piece, end="", markup=False, highlight=False, soft_wrap=True)
                extra = event.get("converge") or extra
    except httpx.ConnectError:
        client.unreachable()
    if show:
        output.console.print()
    return extra


def _after(extra: dict[str, Any]) -> None:
    """What the answer stood on: the sources it cites, the tools it called."""
    for c in extra.get("citations") or []:
        page = f", page {c['page']}" if c.get("page") is not None else ""
        note(Text(f"  [{c['n']}] {c['title']} ({c['source']}{page}) score {c['score']:.3f}", style="dim"))
    retrieval = extra.get("retrieval") or {}
    if retrieval and not retrieval.get("used"):
        note(Text(f"  no sources used: {retrieval.get('reason')}", style="dim"))
    for step in extra.get("tools") or []:
        outcome = f"error: {step['error']}" if step.get("error") else f"{step.get('duration_ms', 0):.0f} ms"
        args = json.dumps(step.get("arguments"))
        note(Text(f"  tool {step['tool']}({args}) {outcome}", style="dim"))


def chat(
    model: Annotated[
        str | None, typer.Argument(help="A deployment, RAG model or agent (default: the session's)")
    ] = None,
    *,
    session: Annotated[str | None, typer.Option("--session", help="Continue this session (its id)")] = None,
    project: Annotated[str | None, typer.Option("--project", "-p", help="Project name or id")] = None,
    message: Annotated[
        str | None, typer.Option("--message", "-m", help="Send one message, print the answer and exit")
    ] = None,
    system: Annotated[str | None, typer.Option(help="A system message to open a new session with")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="With --message: print the final `converge` field")
    ] = False,
    profile: ProfileOpt = None,
) -> None:
    """Chat with a model of the project, streamed; citations and tool calls follow each answer.
    Type /exit (or Ctrl-D) to leave."""
    if model is None and session is None:
        die("Name a model (a deployment, RAG model or agent), or continue a session with --session")
    client = api(profile)
    params = {"project": client.project_id(project)} if project else {}
    state: dict[str, Any] = {"session_id": session, "first": True}

    def send(text: str, *, show: bool = True) -> dict[str, Any]:
        messages = [{"role": "user", "content": text}]
        if state["first"] and system and not state["session_id"]:
            messages.insert(0, {"role": "system", "content": system})
        body: dict[str, Any] = {"messages": messages, "stream": True}
        if model:
            body["model"] = model
        if state["session_id"]:
            body["session_id"] = state["session_id"]
        extra = _turn(client, body=body, params=params, show=show)
        state["session_id"], state["first"] = extra.get("session_id") or state["session_id"], False
        return extra

    if message is not None:
        extra = send(message, show=not as_json)
        if as_json:
            echo(json.dumps(extra, indent=2))
        else:
            _after(extra)
            note(Text(f"session {state['session_id']}", style="dim"))
        return
    output.err.print(Text("Type /exit or press Ctrl-D to leave.", style="dim"))
    while True:
        try:
            text = input("> ")
        except (EOFError, KeyboardInterrupt):
            break
        if text.strip() in EXIT:
            break
        if text.strip():
            _after(send(text))
    if state["session_id"]:
        note(Text(f"session {state['session_id']} (continue with --session)", style="dim"))
