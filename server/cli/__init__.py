"""The `keyturn` command: `main.py` (serve, proxy, review, and the parser), `audit.py` (`keyturn audit ...`),
`policy.py` (`keyturn policy check|test|explain`)."""

from server.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
