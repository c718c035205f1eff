"""Schema, migrations, partitions and database selection against a real PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
from datetime import date

import pytest

from loaders import db as dbmod
from tests.conftest import query

DOCUMENTED_INSERTS = {
    "tickers": "insert into tickers (symbol) values ('DOC')",
    "watchlists": "insert into watchlists (watchlist_id, symbol) values ('core', 'DOC')",
    "options_chains": (
        "insert into options_chains (time, ticker_id, contract_ticker, expiration_date, strike_price,"
        " option_type, implied_volatility, delta, gamma, theta, vega, open_interest, volume, bid, ask,"
        " last, underlying_price) select %(t)s, id, 'O:DOC260116C00170000', '2026-01-16', 170, 'C',"
        " 0.25, 0.5, 0.03, -0.08, 0.19, 100, 10, 4.5, 4.7, 4.6, 170.1 from tickers where symbol = 'DOC'"
    ),
    "daily_snapshots": "insert into daily_snapshots (time, ticker_id) select %(t)s, id from tickers where symbol = 'DOC'",
}


def test_upgrade_twice_changes_nothing(database: dbmod.Database) -> None:
    before = query(database, "select version, checksum, applied_at from schema_migrations order by 1")
    assert before, "the template database has the migrations recorded"
    assert dbmod.upgrade(database) == []
    assert query(database, "select version, checksum, applied_at from schema_migrations order by 1") == before


@pytest.mark.parametrize("when", ["1999-12-31 23:59:59.999999+00", "2026-03-02 23:59:59.999999+00",
                                  "2087-07-01 00:00:00+00"])
def test_plain_insert_of_documented_columns_succeeds(database: dbmod.Database, when: str) -> None:
    with database.connect() as conn, conn.cursor() as cur:
        for sql in DOCUMENTED_INSERTS.values():
            cur.execute(sql, {"t": when})
    assert query(database, "select count(*) from options_chains")[0][0] == 1
    assert query(database, "select count(*) from daily_snapshots")[0][0] == 1


def test_partition_created_on_demand_moves_rows_from_default(database: dbmod.Database) -> None:
    with database.connect() as conn, conn.cursor() as cur:
        cur.execute(DOCUMENTED_INSERTS["tickers"])
        cur.execute(DOCUMENTED_INSERTS["options_chains"], {"t": "2031-05-20 23:59:59.999999+00"})
    assert query(database, "select tableoid::regclass::text from options_chains") == [("options_chains_default",)]
    with database.connect() as conn:
        dbmod.ensure_partitions(conn, [date(2031, 5, 20)])
        dbmod.ensure_partitions(conn, [date(2031, 5, 21)])  # second call is a no-op
    assert query(database, "select tableoid::regclass::text from options_chains") == [("options_chains_2031_05",)]
    with pytest.raises(Exception, match="duplicate key"), database.connect() as conn, conn.cursor() as cur:
        cur.execute(DOCUMENTED_INSERTS["options_chains"], {"t": "2031-05-20 23:59:59.999999+00"})


def test_unknown_extra_columns_survive_an_upgrade(database: dbmod.Database) -> None:
    with database.connect() as conn, conn.cursor() as cur:
        cur.execute("alter table daily_snapshots add column close_price numeric")
        cur.execute(DOCUMENTED_INSERTS["tickers"])
        cur.execute("insert into daily_snapshots (time, ticker_id, close_price)"
                    " select now(), id, 12.5 from tickers")
        cur.execute("delete from schema_migrations")  # force every migration to run again
    assert dbmod.upgrade(database) != []
    assert query(database, "select close_price from daily_snapshots") == [(12.5,)]


def test_prune_drops_only_old_months(database: dbmod.Database) -> None:
    with database.connect() as conn, conn.cursor() as cur:
        dbmod.ensure_partitions(conn, [date(2020, 1, 5), date(2099, 1, 5)])
        cur.execute("select drop_options_chains_partitions_before(date '2030-01-01')")
        assert cur.fetchone()[0] == 1
    names = {r[0] for r in query(database, "select relname from pg_class where relkind = 'r' and relname like 'options_chains_2%'")}
    assert names == {"options_chains_2099_01"}


def test_url_forms_parse_to_the_same_socket() -> None:
    a = dbmod.Database.from_url("postgresql://postgres:@/kapman?host=/tmp/Sock Dir")
    b = dbmod.Database.from_url(a.url())
    assert (a.host, a.dbname) == (b.host, b.dbname) == ("/tmp/Sock Dir", "kapman")
    assert "%2Ftmp%2FSock" in a.url()


def test_unreachable_db_url_is_one_line_and_exit_1(tmp_path) -> None:
    url = "postgresql://someone:hunter2@127.0.0.1:1/nowhere"
    proc = subprocess.run([sys.executable, "-m", "loaders.cli", "db", "upgrade", "--db-url", url],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "nowhere" in lines[0] and "127.0.0.1:1" in lines[0]
    assert "hunter2" not in proc.stderr and "Traceback" not in proc.stderr


def test_embedded_server_is_started_on_demand_and_stopped(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "loaders.cli", "env"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert f"export PGHOST={tmp_path}/.kapman/pgdata" in proc.stdout
    assert "export DBT_PROFILES_DIR=" in proc.stdout
    assert (tmp_path / ".kapman" / "pgdata" / "PG_VERSION").exists()
    # Not left running: no postmaster.pid once the command has finished.
    assert not (tmp_path / ".kapman" / "pgdata" / "postmaster.pid").exists()
