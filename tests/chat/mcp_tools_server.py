"""A small MCP tool server for the agent tests, built with the official SDK's `MCPServer`.

    python tests/chat/mcp_tools_server.py stdio              # over stdin/stdout
    python tests/chat/mcp_tools_server.py http --port 8123   # streamable HTTP at /mcp

Its tools are deterministic, so a test can assert the exact result an agent was given:
`convert_units` (length and mass), `lookup_capital` (a fixed table) and `explode` (always
fails). `env_probe` reports which of the given environment variables the process can see, so a
test can check that a stdio server does not inherit the Converge host's secrets; `sleep`
waits, for the per-call timeout.
"""

from __future__ import annotations

import argparse
import os
import time

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

FACTORS = {  # to metres / kilograms
    "mm": 0.001,
    "cm": 0.01,
    "m": 1.0,
    "km": 1000.0,
    "in": 0.0254,
    "ft": 0.3048,
    "mi": 1609.344,
    "g": 0.001,
    "kg": 1.0,
    "lb": 0.45359237,
}
KIND = {"mm": "length", "cm": "length", "m": "length", "km": "length", "in": "length", "ft": "length"}
KIND |= {"mi": "length", "g": "mass", "kg": "mass", "lb": "mass"}
CAPITALS = {"france": "Paris", "japan": "Tokyo", "kenya": "Nairobi", "peru": "Lima"}

server = MCPServer("converge-test-tools", log_level="WARNING")


@server.tool()
def convert_units(value: float, from_unit: str, to_unit: str) -> str:
    """Convert a length or mass between units (mm, cm, m, km, in, ft, mi, g, kg, lb)."""
    for unit in (from_unit, to_unit):
        if unit not in FACTORS:
            raise ToolError(f"unknown unit {unit!r}")
    if KIND[from_unit] != KIND[to_unit]:
        raise ToolError(f"cannot convert {KIND[from_unit]} to {KIND[to_unit]}")
    result = value * FACTORS[from_unit] / FACTORS[to_unit]
    return f"{value:g} {from_unit} = {result:.4f} {to_unit}"


@server.tool()
def lookup_capital(country: str) -> str:
    """The capital city of a country (from a small fixed table)."""
    capital = CAPITALS.get(country.strip().lower())
    if capital is None:
        raise ToolError(f"no capital known for {country!r}")
    return capital


@server.tool()
def explode(reason: str = "on purpose") -> str:
    """A tool that always fails."""
    raise ToolError(f"the explode tool failed {reason}")


@server.tool()
def env_probe(names: list[str]) -> dict[str, bool]:
    """Which of these environment variables this server process can see."""
    return {name: name in os.environ for name in names}


@server.tool()
def sleep(seconds: float) -> str:
    """Wait, then answer."""
    time.sleep(seconds)
    return f"slept {seconds:g} s"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("transport", choices=["stdio", "http"])
    parser.add_argument("--port", type=int, default=8123)
    args = parser.parse_args()
    if args.transport == "stdio":
        server.run("stdio")
    else:
        server.run("streamable-http", host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
