"""Tools an agent is offered: the built-in ones and MCP servers' (`open_toolbox`)."""
