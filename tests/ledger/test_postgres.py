"""The PostgreSQL store's own promises: numbered migrations applied once by instances starting together, a URL's
password never shown, a clear error without psycopg, a write whose connection is lost during COMMIT neither lost
nor written twice, and the commands (`serve --http`, `audit verify|show|tail`, `policy replay`) on a
`postgresql://` ledger. The behaviour both stores share is tested against both (the `stores` fixture)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid

import anyio
import psycopg
import pytest

from server.config import Settings, load_settings, safe_url
from server.errors import LedgerError
from server.ledger.pg_schema import MIGRATIONS
from server.ledger.postgres import PostgresStore
from tests.conftest import ROOT, Home, ReviewerAPI, agent_client
from tests.helpers import client_call
from tests.pg import Cluster


def fresh(postgres: Cluster) -> str:
    return postgres.create_database(f"k_{uuid.uuid4().hex[:16]}")


async def test_instances_starting_together_apply_each_migration_once(postgres: Cluster) -> None:
    url = fresh(postgres)
    stores = [PostgresStore(url) for _ in range(4)]
    async with anyio.create_task_group() as tg:
        for store in stores:
            tg.start_soon(store.open)
    try:
        with psycopg.connect(url) as conn:
            versions = [r[0] for r in conn.execute("SELECT version FROM schema_version ORDER BY version")]
            ts_type = conn.execute("SELECT data_type FROM information_schema.columns"
                                   " WHERE table_name = 'events' AND column_name = 'ts'").fetchone()
        assert versions == list(range(1, len(MIGRATIONS) + 1))
        assert ts_type == ("double precision",)  # the hash covers the timestamp: it must read back bit for bit
        await stores[0].append("process.started", None, {"ts": 1795314156.4804032})
        assert (await stores[1].verify()).ok
    finally:
        for store in stores:
            await store.close()


def test_a_url_s_password_is_never_shown() -> None:
    url = "postgresql://keyturn:s3cret-pw@db.internal:5433/ledger?sslmode=require"
    assert safe_url(url) == "postgresql://keyturn:***@db.internal:5433/ledger?sslmode=require"
    settings = Settings(db=url)  # type: ignore[arg-type]
    assert settings.database_url == url and "s3cret" not in repr(settings) and "s3cret" not in settings.ledger_name
    assert str(settings.db) == "keyturn.db"  # where the files beside a ledger are kept


async def test_an_unreachable_database_fails_closed_with_a_clear_error_and_no_password(postgres: Cluster) -> None:
    url = f"postgresql://postgres:s3cret-pw@127.0.0.1:{postgres.port + 1}/nowhere"
    with pytest.raises(LedgerError) as refused:
        await PostgresStore(url, connect_timeout_s=2).open()
    assert "cannot connect to the ledger at postgresql://postgres:***@127.0.0.1" in str(refused.value)
    assert "s3cret" not in str(refused.value)


def test_without_psycopg_a_postgres_ledger_is_one_clear_line() -> None:
    probe = ("import sys; sys.modules['psycopg'] = None\n"
             "from server.cli.main import main\n"
             "sys.exit(main(['audit', 'tail', '--db', 'postgresql://u:pw@127.0.0.1:1/x']))\n")
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode != 0
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert lines == ["keyturn: a postgresql:// ledger needs psycopg: pip install 'keyturn[postgres]'"], p.stderr


async def test_a_connection_lost_during_commit_writes_nothing_and_fails_closed(postgres: Cluster) -> None:
    """A commit held up by the database (a deferred trigger that waits), and the connection cut meanwhile: the
    write fails with a ledger error, its event is not in the chain, nobody retries it, and the next write links
    to the event before it."""
    url = fresh(postgres)
    async with PostgresStore(url) as ledger:
        await ledger.append("process.started", None, {"n": 1})
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute("""
                CREATE FUNCTION keyturn_test_slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN IF NEW.kind = 'slow' THEN PERFORM pg_sleep(30); END IF; RETURN NULL; END $$;
                CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON events DEFERRABLE INITIALLY DEFERRED
                FOR EACH ROW EXECUTE FUNCTION keyturn_test_slow_commit();""")

            def cut_when_committing() -> None:
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    rows = admin.execute("SELECT pid FROM pg_stat_activity WHERE query LIKE '%COMMIT'"
                                         " AND wait_event = 'PgSleep' AND pid <> pg_backend_pid()").fetchall()
                    if rows:
                        admin.execute("SELECT pg_terminate_backend(%s)", (rows[0][0],))
                        return
                    time.sleep(0.02)

            cutter = threading.Thread(target=cut_when_committing)
            cutter.start()
            with anyio.fail_after(25), pytest.raises(LedgerError, match="lost during the commit"):
                await ledger.append("slow", None, {"n": 2})
            cutter.join()
            admin.execute("DROP TRIGGER slow_commit ON events")
        assert [e.kind for e in await ledger.tail(10)] == ["process.started"]
        after = await ledger.append("process.started", None, {"n": 3})
        assert after.seq == 2
        assert (await ledger.verify()).ok


async def test_serve_audit_and_replay_on_postgres(home: Home, postgres: Cluster) -> None:
    """`keyturn serve --http` with `db: postgresql://...`: a held call approved through the reviewer API runs once;
    `audit verify`, `audit show`, `audit tail` and `policy replay` read the same ledger; the password is shown
    nowhere."""
    database = f"k_{uuid.uuid4().hex[:16]}"
    postgres.create_database(database)
    url = postgres.url(database, password="s3cret-pw")  # (trust authentication: the password is not asked for)
    home.write_config(db=url)
    base = home.serve_http()
    api = ReviewerAPI(base)
    async with agent_client(base) as client:
        async with client_call(client, "sql_execute", {"statement": "DELETE FROM orders WHERE item = 'pear'"}) as call:
            req = await api.wait_pending("sql_execute")
            assert (await api.vote(req["id"], "approve", "alice", "fine")).status_code == 200
        result = await call.result()
    assert not result.is_error
    assert home.rows("SELECT item FROM orders ORDER BY id") == [("apple",), ("plum",)]
    assert not (home.dir / "ledger.db").exists()  # the ledger is in PostgreSQL
    home.stop_all()
    log = "".join(p.read_text() for p in home.dir.glob("serve-*.log"))
    assert "postgresql://postgres:***@127.0.0.1" in log and "s3cret" not in log

    verify = home.keyturn("audit", "verify", "--config", str(home.config))
    assert verify.returncode == 0 and "chain intact" in verify.stdout, verify.stdout + verify.stderr
    show = home.keyturn("audit", "show", req["id"], "--db", url)
    assert show.returncode == 0 and "approval.granted" in show.stdout and "executed" in show.stdout, show.stderr
    tail = home.keyturn("audit", "tail", "-n", "50", "--db", url)
    assert tail.returncode == 0 and req["id"] in tail.stdout, tail.stderr
    candidate = home.dir / "candidate.yaml"
    candidate.write_text("version: 1\ndefault: deny\n")
    replay = home.keyturn("policy", "replay", str(candidate), "--config", str(home.config))
    assert replay.returncode == 0, replay.stderr
    assert "sql_execute" in replay.stdout and "deny" in replay.stdout, replay.stdout
    for out in (verify, show, tail, replay):
        assert "s3cret" not in out.stdout + out.stderr
    settings = load_settings(home.config)
    assert settings.database_url == url


@pytest.mark.parametrize("spelling", [
    "postgresql://postgres@127.0.0.1:{port}/{db}",
    "postgresql://agent@localhost:{port}/{db}",
    "postgres://postgres@localhost.:{port}/{db}?sslmode=disable",
    "postgresql://postgres@[::1]:{port}/{db}",
])
def test_the_sql_pack_may_not_connect_to_the_ledger_s_database(postgres: Cluster, spelling: str) -> None:
    """An agent's SQL tool pointed at keyturn's own PostgreSQL ledger (by any spelling of the same server and
    database) is refused at load, as a SQLite ledger file is."""
    from server.errors import ConfigError
    from server.execution import PackContext
    from server.guarded import ToolRegistry, load_pack

    database = f"k_{uuid.uuid4().hex[:16]}"
    ledger = postgres.create_database(database)
    context = PackContext.for_state([], ledger_url=ledger)
    url = spelling.format(port=postgres.port, db=database)
    with pytest.raises(ConfigError, match="keyturn's own ledger database"):
        load_pack("tools.sql", ToolRegistry(), {"database": url}, context)
    other = postgres.create_database(f"k_{uuid.uuid4().hex[:16]}")
    load_pack("tools.sql", ToolRegistry(), {"database": other}, context)  # another database is the agent's to use
