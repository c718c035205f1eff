"""Test harness: a real PostgreSQL server for the session (external via KAPMAN_TEST_DATABASE_URL,
else embedded), and a fresh database per test cloned from a template that already has the schema."""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest
from pytest_postgresql.janitor import DatabaseJanitor

from loaders import db as dbmod
from loaders.trading_calendar import TODAY_VARIABLE, is_trading_day

# "Today" for the whole suite, whatever the wall clock says: every command the tests run (and their
# child processes) reads it from KAPMAN_TODAY. `make test-dates` runs the suite on other dates.
FROZEN_TODAY = date.fromisoformat(os.environ.get("KAPMAN_TEST_TODAY", "2025-12-19"))
if not is_trading_day(FROZEN_TODAY):
    raise pytest.UsageError(f"KAPMAN_TEST_TODAY={FROZEN_TODAY} is not an NYSE trading day")
os.environ[TODAY_VARIABLE] = FROZEN_TODAY.isoformat()

PROJECT_DIR = Path(__file__).resolve().parent.parent
pytest_plugins = (
    ["tests.simulator_fixtures"] if (PROJECT_DIR / "tests" / "simulator_fixtures.py").exists() else []
)
_counter = itertools.count()


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dbmod.Database]:
    """The server every test database lives on."""
    url = os.environ.get("KAPMAN_TEST_DATABASE_URL")
    if url:
        yield dbmod.Database.from_url(url)
        return
    server = dbmod.import_pgserver().get_server(tmp_path_factory.mktemp("pg") / "pgdata", cleanup_mode="delete")
    yield dbmod.Database.from_url(server.get_uri())
    server.cleanup()


def _janitor(server: dbmod.Database, dbname: str, template: str | None = None,
             as_template: bool = False) -> DatabaseJanitor:
    return DatabaseJanitor(
        user=server.user, host=server.host, port=server.port, password=server.password or None,
        dbname=dbname, template_dbname=template, as_template=as_template,
    )


@pytest.fixture(scope="session")
def template_db(pg_server: dbmod.Database) -> Iterator[str]:
    """A database with the schema applied once; every test database is a cheap copy of it."""
    name = f"kapman_template_{os.getpid()}"
    janitor = _janitor(pg_server, name, as_template=True)
    janitor.drop()
    janitor.init()
    dbmod.upgrade(pg_server.with_dbname(name))
    yield name
    janitor.drop()


@contextlib.contextmanager
def fresh_database(pg_server: dbmod.Database, template_db: str,
                   prefix: str = "kapman_test") -> Iterator[dbmod.Database]:
    """A migrated database cloned from the template, dropped afterwards."""
    name = f"{prefix}_{os.getpid()}_{next(_counter)}"
    janitor = _janitor(pg_server, name, template=template_db)
    janitor.init()
    try:
        yield pg_server.with_dbname(name)
    finally:
        janitor.drop()


@pytest.fixture
def database(pg_server: dbmod.Database, template_db: str) -> Iterator[dbmod.Database]:
    """A fresh, migrated database for one test."""
    with fresh_database(pg_server, template_db) as db:
        yield db


@pytest.fixture
def db_url(database: dbmod.Database) -> str:
    """The test database as a URL for `--db-url`."""
    return database.url()


def query(database: dbmod.Database, sql: str, params: tuple | dict | None = None) -> list[tuple]:
    """Run one statement and return its rows (helper for assertions)."""
    with database.connect() as conn, conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall() if cur.description else []
