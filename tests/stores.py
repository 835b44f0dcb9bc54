"""Both ledger stores for the tests that hold for either: `Stores` opens a SQLite file or a fresh PostgreSQL database
(on the session's throwaway cluster, see tests/pg.py) by name, and lets a test change rows behind keyturn's back
as someone with write access to the database would."""

from __future__ import annotations

import sqlite3
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.ledger.sqlite import SqliteStore
from tests.pg import Cluster

if TYPE_CHECKING:
    from server.ledger.postgres import PostgresStore


@dataclass
class Stores:
    kind: str  # "sqlite" or "postgres"
    dir: Path
    cluster: Cluster | None = None
    _urls: dict[str, str] = field(default_factory=dict)

    @property
    def postgres(self) -> bool:
        return self.kind == "postgres"

    def where(self, name: str = "l") -> str:
        """The ledger named `name`: a file path, or a postgresql:// URL (its database made on first use)."""
        if self.cluster is None:
            return str(self.dir / f"{name}.db")
        if name not in self._urls:
            self._urls[name] = self.cluster.create_database(f"k_{uuid.uuid4().hex[:16]}")
        return self._urls[name]

    def new(self, name: str = "l", **options: Any) -> SqliteStore | PostgresStore:
        """A store (not yet opened) on the ledger named `name`: a second call gives another store on the same one,
        as another keyturn process has."""
        if self.cluster is None:
            return SqliteStore(self.where(name), **options)
        from server.ledger.postgres import PostgresStore

        return PostgresStore(self.where(name), **options)

    def tamper(self, sql: str, name: str = "l") -> list[tuple[Any, ...]]:
        """Run `sql` (statements separated by `;`) on the ledger directly, outside keyturn; the last one's rows."""
        rows: list[tuple[Any, ...]] = []
        if self.cluster is None:
            with sqlite3.connect(self.where(name)) as conn:
                for statement in filter(str.strip, sql.split(";")):
                    rows = list(conn.execute(statement))
            return rows
        import psycopg

        with psycopg.connect(self.where(name), autocommit=True) as conn:
            for statement in filter(str.strip, sql.split(";")):
                cur = conn.execute(statement)
                rows = list(cur.fetchall()) if cur.description else []
        return rows

    def refuse_writes(self, store: Any, name: str = "l") -> Any:
        """Make the ledger refuse every write from now on (an awaitable): SQLite's query_only on the store's own
        connection; on PostgreSQL, read-only transactions for the database, and its sessions ended (the store
        reconnects, read-only)."""
        if self.cluster is None:
            return store._run(lambda conn: conn.execute("PRAGMA query_only = ON"))
        database = self.where(name).rsplit("/", 1)[1]
        self.cluster.psql(f'ALTER DATABASE "{database}" SET default_transaction_read_only = on')
        self.cluster.psql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{database}'"
                          " AND pid <> pg_backend_pid()")
        return _done()


async def _done() -> None:
    return None

