"""A throwaway PostgreSQL server for tests: its own cluster in a temporary directory, on a free loopback port.

`start_cluster()` runs `initdb` (as the `postgres` user when the tests run as root, since initdb refuses root),
starts the server with `pg_ctl -w` on 127.0.0.1 with its unix socket inside the cluster's directory, and returns a
`Cluster` that can create databases and roles and is stopped and removed by `stop()`. Nothing outside the temporary
directory is touched. `find_bindir()` says where the server binaries are, or None (the caller skips).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

SUPERUSER = "postgres"


def find_bindir() -> Path | None:
    """The directory holding initdb, pg_ctl and psql: on PATH, or Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    bindir: Path
    dir: Path
    port: int

    @property
    def data(self) -> Path:
        return self.dir / "data"

    def url(self, database: str = "postgres", user: str = SUPERUSER, password: str | None = None) -> str:
        auth = user if password is None else f"{user}:{password}"
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL as the superuser (stops at the first error) and return what psql printed."""
        done = subprocess.run(
            [str(self.bindir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
             "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER, "-d", database, "-c", sql],
            capture_output=True, text=True, check=False, env={**os.environ, "PGCONNECT_TIMEOUT": "10"},
        )
        if done.returncode != 0:
            raise RuntimeError(f"psql failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def create_role(self, name: str) -> None:
        """A login role without superuser rights (trust authentication: no password)."""
        self.psql(f'CREATE ROLE "{name}" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE')

    def create_database(self, name: str, owner: str = SUPERUSER) -> str:
        """A new empty database owned by `owner` (an existing role); the URL to connect to it as `owner`."""
        self.psql(f'CREATE DATABASE "{name}" OWNER "{owner}"')
        return self.url(name, owner)

    def stop(self) -> None:
        _as_owner([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"], check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


def _as_owner(argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        argv = ["runuser", "-u", SUPERUSER, "--", *argv]
    return subprocess.run(argv, capture_output=True, text=True, check=check, stdin=subprocess.DEVNULL)


def start_cluster(bindir: Path, attempts: int = 3) -> Cluster:
    """initdb and start a cluster (trust authentication, loopback only, fsync off: it is thrown away)."""
    # Not under pytest's tmp_path: that lies in a directory only root may enter, and the server runs as postgres.
    root = Path(tempfile.mkdtemp(prefix="keyturn-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, SUPERUSER)
    cluster = Cluster(bindir, root, 0)
    try:
        _as_owner([str(bindir / "initdb"), "-D", str(cluster.data), "-U", SUPERUSER, "--auth=trust",
                   "--no-sync", "-E", "UTF8", "--locale=C"])
        for _ in range(attempts):  # another process may take the free port before the server binds it
            cluster.port = _free_port()
            options = (f"-c listen_addresses=127.0.0.1 -p {cluster.port} -k {root} "
                       "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
            started = _as_owner([str(bindir / "pg_ctl"), "-D", str(cluster.data), "-o", options,
                                 "-l", str(root / "server.log"), "-w", "-t", "60", "start"], check=False)
            if started.returncode == 0:
                return cluster
        log = (root / "server.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"PostgreSQL did not start after {attempts} attempts: {started.stderr.strip()}\n{log}")
    except BaseException:
        cluster.stop()
        raise
