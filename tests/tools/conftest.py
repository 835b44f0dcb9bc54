"""Fixtures for the tool packs' tests: a real PostgreSQL server for the SQL pack (see tests/pg.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.pg import Cluster, find_bindir, start_cluster


@pytest.fixture(scope="session")
def postgres() -> Iterator[Cluster]:
    """One throwaway PostgreSQL cluster for the whole run, stopped and removed at the end."""
    bindir = find_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL's server (initdb) is not installed; scripts/test-deps installs Debian's postgresql")
    cluster = start_cluster(bindir)
    try:
        yield cluster
    finally:
        cluster.stop()
