"""Which store a keyturn process opens: PostgreSQL for a `postgresql://` ledger, else the SQLite file."""

from __future__ import annotations

from server.config import Settings
from server.errors import KeyturnError
from server.ledger.sqlite import SqliteStore
from server.ledger.store import Store


def store_for(settings: Settings) -> Store:
    """The store `settings` name, not yet opened (`await store.open()`, or `async with`)."""
    if settings.database_url:
        from server.ledger.postgres import PostgresStore  # psycopg only when asked for

        return PostgresStore(settings.database_url)
    return SqliteStore(settings.db)


async def open_existing(settings: Settings) -> Store:
    """The ledger a reading command opens (`audit`, `policy replay`): a SQLite file must exist already."""
    if settings.database_url is None and not settings.db.exists():
        raise KeyturnError(f"no ledger at {settings.db}")
    store = store_for(settings)
    await store.open()
    return store
