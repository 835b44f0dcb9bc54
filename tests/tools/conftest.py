"""Fixtures for the tool packs' tests: the real PostgreSQL server for the SQL pack is the session's `postgres`
(tests/conftest.py, see tests/pg.py)."""
