"""The ledger's tables, made and changed by numbered migrations: each runs once, in order, in one transaction,
and `schema_version` records the last one applied."""

from __future__ import annotations

import sqlite3

MIGRATIONS: tuple[str, ...] = (
    # 1: events, calls, votes, instances
    """
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY,
        ts REAL NOT NULL,
        kind TEXT NOT NULL,
        call_id TEXT,
        payload TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    );
    CREATE INDEX events_call ON events(call_id, seq);
    CREATE INDEX events_kind ON events(kind, seq);
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
        created REAL NOT NULL,
        expires REAL,
        updated REAL NOT NULL,
        holder TEXT,
        outcome_reason TEXT
    );
    CREATE INDEX calls_state ON calls(state);
    CREATE INDEX calls_same ON calls(principal, tool, args_hash, state);
    CREATE TABLE votes (
        call_id TEXT NOT NULL,
        person TEXT NOT NULL,
        reviewer TEXT NOT NULL,
        verdict TEXT NOT NULL,
        reason TEXT,
        groups TEXT NOT NULL DEFAULT '[]',
        ts REAL NOT NULL,
        PRIMARY KEY (call_id, person)
    );
    CREATE TABLE instances (
        id TEXT PRIMARY KEY,
        host TEXT NOT NULL,
        pid INTEGER NOT NULL,
        started REAL NOT NULL,
        heartbeat REAL NOT NULL
    );
    CREATE TABLE chain_head (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        seq INTEGER NOT NULL,
        hash TEXT NOT NULL
    );
    """,
    # 2: fewer pages written per call. `find_open` looks only for open requests, so its index holds only those
    #    (a call that runs at once never enters it); no query reads events by kind.
    """
    DROP INDEX calls_same;
    CREATE INDEX calls_open_same ON calls(principal, tool, args_hash) WHERE state IN ('pending','approved');
    DROP INDEX events_kind;
    """,
    # 3: the housekeeping sweep for expired requests reads only those (held calls alone are in this index).
    """
    CREATE INDEX calls_open_expires ON calls(expires) WHERE state IN ('pending','approved');
    """,
    # 4: reviewers' web sessions, server-side: the cookie holds a random id, this table only its sha256.
    #    Outside the chain: signing in decides nothing (the votes a session casts are chained).
    """
    CREATE TABLE web_sessions (
        id_sha256 TEXT PRIMARY KEY,
        identity TEXT NOT NULL,
        token_fp TEXT NOT NULL,
        created REAL NOT NULL,
        expires REAL NOT NULL,
        last_seen REAL NOT NULL,
        revoked REAL
    );
    CREATE INDEX web_sessions_expires ON web_sessions(expires);
    """,
    # 5: signed checkpoints of the chain head (server.ledger.checkpoints). Outside the chain, and a convenience only: the
    #    witnesses hold the copies that count; a row here cannot be forged without the signing key.
    """
    CREATE TABLE checkpoints (
        seq INTEGER NOT NULL,
        key_id TEXT NOT NULL,
        hash TEXT NOT NULL,
        chain TEXT NOT NULL,
        time REAL NOT NULL,
        sig TEXT NOT NULL,
        PRIMARY KEY (seq, key_id)
    );
    """,
    # 6: rejoining a held call. The same call again finds its request in any state until the request's expiry
    #    (held calls alone have an expiry, so only they are in this index). A result kept for the retry lives in
    #    the process's memory, never in this file (it may carry what the agent was approved to read).
    """
    CREATE INDEX calls_held_same ON calls(principal, tool, args_hash, created) WHERE expires IS NOT NULL;
    """,
    # 7: standing grants (server.approvals.grants): an index of the grant.* events, chained under the grant's id. A
    #    use is one conditional update here plus its chained event, in one transaction: the last use is won once.
    """
    CREATE TABLE grants (
        id TEXT PRIMARY KEY,
        request_id TEXT NOT NULL,
        principal TEXT NOT NULL,
        on_behalf_of TEXT,
        tool TEXT NOT NULL,
        spec TEXT NOT NULL,
        created REAL NOT NULL,
        expires REAL NOT NULL,
        uses INTEGER NOT NULL,
        used INTEGER NOT NULL DEFAULT 0,
        state TEXT NOT NULL,
        ended REAL,
        end_reason TEXT
    );
    CREATE INDEX grants_live ON grants(principal, tool) WHERE state = 'live';
    """,
)


def migrate(conn: sqlite3.Connection) -> None:
    """Apply the migrations this database has not had yet, in one `BEGIN IMMEDIATE` transaction."""
    conn.execute("BEGIN IMMEDIATE")
    try:
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
        conn.execute("ROLLBACK")
        raise
