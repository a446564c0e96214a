"""The server: REST (FastAPI), MCP and the web page over one Memory. Needs `memstack[server]`."""
