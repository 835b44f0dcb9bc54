"""The ledger: an append-only, hash-chained event store, and the materialised state of each call.

Every write is one transaction: it reads the chain's head, appends the next events and updates the `calls` row
together, so several keyturn processes sharing one store keep one linear chain, and a conditional update (a
claim, a vote, a call's end) is won by exactly one of them. Events are announced to in-process listeners only
after their commit, and a write returns only once committed.

The room, one concern a module:
  store.py    the interface the rest of keyturn uses (`Store`, `Transaction`): every operation, named for what it does
  sqlite.py   `SqliteStore`, the SQLite implementation (`Ledger` is its name here)
  postgres.py `PostgresStore`, the PostgreSQL implementation (several instances, one chain), with pg_db.py (pooled
              connections speaking the same SQL), pg_schema.py (its migrations) and pg_listen.py (LISTEN/NOTIFY)
  opening.py  which store a process opens (`db: postgresql://...` or a SQLite file)
  db.py       the SQLite connections, their threads, transactions' retries and WAL checkpoints
  schema.py   the tables, by numbered migrations
  tx.py       a write transaction in progress (`Tx`)
  queries.py  the reads
  feed.py     following the chain: one subscription for every follower (the broker, the channels, the inbox)
  chain.py    hashing and linking events, and checking the chain
  audit.py, replay.py, bundle.py   `audit verify`, the tables replayed from the chain, offline bundles
Only this package speaks SQL to the ledger (a test holds every other module to it).
"""

from server.ledger.chain import GENESIS, VerifyResult, event_hash
from server.ledger.feed import Subscription
from server.ledger.queries import CallFilter, Row, row_to_event, row_to_view
from server.ledger.schema import MIGRATIONS
from server.ledger.sqlite import Ledger, SqliteStore
from server.ledger.store import Store, Transaction
from server.ledger.tx import Tx

__all__ = [
    "GENESIS", "MIGRATIONS", "CallFilter", "Ledger", "Row", "SqliteStore", "Store", "Subscription", "Transaction",
    "Tx", "VerifyResult", "event_hash", "row_to_event", "row_to_view",
]
