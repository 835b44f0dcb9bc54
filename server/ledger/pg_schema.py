"""The ledger's tables on PostgreSQL: the same numbered migrations as `server.ledger.schema`, in PostgreSQL's types
(times are `double precision`: an event's hash covers its timestamp, which must read back bit for bit), applied at
start in one transaction under an advisory lock, so instances starting together apply each migration once."""

from __future__ import annotations

from server.ledger.pg_db import PgConnection

MIGRATE_LOCK = 0x6B65797475726E01
"""The transaction-level advisory lock key the migrations are applied under ("keyturn" + 1)."""
CHAIN_LOCK = 0x6B65797475726E02
"""The transaction-level advisory lock key every write holds: the chain's head is read and extended under it."""

NOTIFY_CHANNEL = "keyturn_ledger"
"""The LISTEN/NOTIFY channel a commit that appended events announces itself on."""

MIGRATIONS: tuple[str, ...] = (
    # 1: events, calls, votes, instances
    """
    CREATE TABLE events (
        seq BIGINT PRIMARY KEY,
        ts DOUBLE PRECISION NOT NULL,
        kind TEXT NOT NULL,
        call_id TEXT,
        payload TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    );
    CREATE INDEX events_call ON events(call_id, seq);
    CREATE TABLE calls (
        id TEXT PRIMARY KEY,
        tool TEXT NOT NULL,
        principal TEXT NOT NULL,
        on_behalf_of TEXT,
        model TEXT,
        args_hash TEXT NOT NULL,
        arguments TEXT NOT NULL,
        state TEXT NOT NULL,
        risk TEXT,
        reason TEXT,
        rules TEXT NOT NULL DEFAULT '[]',
        review TEXT,
        policy_digest TEXT,
        created DOUBLE PRECISION NOT NULL,
        expires DOUBLE PRECISION,
        updated DOUBLE PRECISION NOT NULL,
        holder TEXT,
        outcome_reason TEXT
    );
    CREATE INDEX calls_state ON calls(state);
    CREATE TABLE votes (
        call_id TEXT NOT NULL,
        person TEXT NOT NULL,
        reviewer TEXT NOT NULL,
        verdict TEXT NOT NULL,
        reason TEXT,
        groups TEXT NOT NULL DEFAULT '[]',
        ts DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (call_id, person)
    );
    CREATE TABLE instances (
        id TEXT PRIMARY KEY,
        host TEXT NOT NULL,
        pid INTEGER NOT NULL,
        started DOUBLE PRECISION NOT NULL,
        heartbeat DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE chain_head (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        seq BIGINT NOT NULL,
        hash TEXT NOT NULL
    )
    """,
    # 2: `find_open` looks only for open requests
    """
    CREATE INDEX calls_open_same ON calls(principal, tool, args_hash) WHERE state IN ('pending','approved')
    """,
    # 3: the housekeeping sweep for expired requests reads only those
    """
    CREATE INDEX calls_open_expires ON calls(expires) WHERE state IN ('pending','approved')
    """,
    # 4: reviewers' web sessions, server-side (only the cookie's sha256)
    """
    CREATE TABLE web_sessions (
        id_sha256 TEXT PRIMARY KEY,
        identity TEXT NOT NULL,
        token_fp TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        expires DOUBLE PRECISION NOT NULL,
        last_seen DOUBLE PRECISION NOT NULL,
        revoked DOUBLE PRECISION
    );
    CREATE INDEX web_sessions_expires ON web_sessions(expires)
    """,
    # 5: signed checkpoints of the chain head
    """
    CREATE TABLE checkpoints (
        seq BIGINT NOT NULL,
        key_id TEXT NOT NULL,
        hash TEXT NOT NULL,
        chain TEXT NOT NULL,
        time DOUBLE PRECISION NOT NULL,
        sig TEXT NOT NULL,
        PRIMARY KEY (seq, key_id)
    )
    """,
    # 6: rejoining a held call
    """
    CREATE INDEX calls_held_same ON calls(principal, tool, args_hash, created) WHERE expires IS NOT NULL
    """,
    # 7: liveness by leases: an instance's lease runs until `lease_until` (database time), renewed by its heartbeat
    """
    ALTER TABLE instances ADD COLUMN lease_until DOUBLE PRECISION
    """,
    # 8: standing grants (server.approvals.grants), as SQLite's migration 7
    """
    CREATE TABLE grants (
        id TEXT PRIMARY KEY,
        request_id TEXT NOT NULL,
        principal TEXT NOT NULL,
        on_behalf_of TEXT,
        tool TEXT NOT NULL,
        spec TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        expires DOUBLE PRECISION NOT NULL,
        uses INTEGER NOT NULL,
        used INTEGER NOT NULL DEFAULT 0,
        state TEXT NOT NULL,
        ended DOUBLE PRECISION,
        end_reason TEXT
    );
    CREATE INDEX grants_live ON grants(principal, tool) WHERE state = 'live'
    """,
)


def migrate(conn: PgConnection) -> None:
    """Apply the migrations this database has not had yet, in one transaction, under `MIGRATE_LOCK`."""
    conn.execute("BEGIN")
    try:
        conn.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATE_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
        current = row[0] or 0
        for number, script in enumerate(MIGRATIONS, start=1):
            if number > current:
                for statement in filter(str.strip, script.split(";")):
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_version(version) VALUES (?)", (number,))
        conn.execute("COMMIT")
    except BaseException:
        if not conn.broken:
            conn.execute("ROLLBACK")
        raise
