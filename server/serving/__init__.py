"""Serving agents: the MCP server keyturn's tools are served by (`mcp.py`: tools, identity, the built-in
`keyturn_status`/`keyturn_cancel`), its stdio transport (`stdio.py`), and the HTTP app for streamable HTTP
agents and the reviewer channels (`http.py`)."""
