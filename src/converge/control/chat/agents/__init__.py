"""Agents: a chat model, a ruleset, tools, a step limit and a token budget (`runner.py` runs
the loop); the project's MCP tool servers."""
