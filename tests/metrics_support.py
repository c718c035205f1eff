"""Helpers shared by the metrics tests: chains into options_chains, documents out of daily_snapshots."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from datetime import date, datetime
from typing import Any

import pytest
from psycopg2.extras import execute_values

from loaders import cli
from loaders import db as dbmod
from loaders.trading_calendar import snapshot_time
from tests.conftest import query
from tests.metrics_reference import Contract


@pytest.fixture(scope="session", autouse=True)
def dbt_artifacts_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """dbt's target and log folders of this session, away from the project's (other runs use it)."""
    base = tmp_path_factory.mktemp("dbt")
    saved = {k: os.environ.get(k) for k in ("DBT_TARGET_PATH", "DBT_LOG_PATH")}
    os.environ["DBT_TARGET_PATH"], os.environ["DBT_LOG_PATH"] = str(base / "target"), str(base / "logs")
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def add_watchlist(database: dbmod.Database, symbols: Iterable[str], watchlist: str = "core") -> None:
    with database.connect() as conn, conn.cursor() as cur:
        for symbol in symbols:
            cur.execute("insert into watchlists (watchlist_id, symbol) values (%s, %s)"
                        " on conflict do nothing", (watchlist, symbol))
            cur.execute("insert into tickers (symbol) values (%s) on conflict do nothing", (symbol,))


def insert_chain(database: dbmod.Database, symbol: str, at: datetime | date,
                 contracts: list[Contract], source: str | None = None) -> None:
    """One options snapshot of symbol at `at` (a date means its snapshot identity). Without a
    source, the INSERT leaves that column out (a plain INSERT of the documented columns)."""
    moment = snapshot_time(at) if not isinstance(at, datetime) else at
    add_watchlist(database, [symbol])
    rows = [
        (moment, symbol, f"O:{symbol}{c.expiration_date:%y%m%d}{c.option_type}{i:08d}",
         c.expiration_date, 100 + i, c.option_type, c.implied_volatility, c.delta,
         c.open_interest, c.volume, c.day_updated_at, source)
        for i, c in enumerate(contracts)
    ]
    with database.connect() as conn, conn.cursor() as cur:
        execute_values(cur, _INSERT_WITH_SOURCE if source is not None else _INSERT, rows,
                       template=_INSERT_ROW)


_INSERT_ROW = ("(%s::timestamptz, %s, %s, %s::date, %s::numeric, %s, %s::float8, %s::float8,"
               " %s::bigint, %s::bigint, %s::timestamptz, %s::text)")
_INSERT = (
    "insert into options_chains (time, ticker_id, contract_ticker, expiration_date, strike_price,"
    " option_type, implied_volatility, delta, open_interest, volume, day_updated_at)"
    " select v.t, tickers.id, v.ct, v.e, v.k, v.ty, v.iv, v.d, v.oi, v.vol, v.du"
    " from (values %s) as v (t, s, ct, e, k, ty, iv, d, oi, vol, du, src)"
    " join tickers on tickers.symbol = v.s"
)
_INSERT_WITH_SOURCE = (
    "insert into options_chains (time, ticker_id, contract_ticker, expiration_date, strike_price,"
    " option_type, implied_volatility, delta, open_interest, volume, day_updated_at, source)"
    " select v.t, tickers.id, v.ct, v.e, v.k, v.ty, v.iv, v.d, v.oi, v.vol, v.du, v.src"
    " from (values %s) as v (t, s, ct, e, k, ty, iv, d, oi, vol, du, src)"
    " join tickers on tickers.symbol = v.s"
)


def run_metrics(database: dbmod.Database, *args: str) -> int:
    return cli.main(["metrics", "--db-url", database.url(), *args])


def documents(database: dbmod.Database, day: date | None = None) -> dict[tuple[str, date], dict[str, Any]]:
    """Published JSON by (symbol, trading date)."""
    rows = query(
        database,
        "select t.symbol, (d.time at time zone 'utc')::date, d.volatility_metrics_json::text"
        " from daily_snapshots d join tickers t on t.id = d.ticker_id"
        " where d.volatility_metrics_json is not null"
        " and (%(day)s::date is null or (d.time at time zone 'utc')::date = %(day)s::date)",
        {"day": day},
    )
    return {(symbol, as_of): json.loads(text) for symbol, as_of, text in rows}


def assert_documents_match(actual: dict[str, Any], expected: dict[str, Any], where: str) -> None:
    """The spec's JSON, numbers to 1e-6."""
    assert actual["status"] == expected["status"], where
    for key in ("as_of", "options_snapshot_time", "counts", "diagnostics"):
        assert actual[key] == expected[key], f"{where}: {key}"
    assert set(actual["metrics"]) == set(expected["metrics"]), where
    for name, value in expected["metrics"].items():
        got = actual["metrics"][name]
        if value is None or got is None:
            assert got == value, f"{where}: {name} = {got}, expected {value}"
        else:
            assert abs(got - value) <= 1e-6 + 1e-12, f"{where}: {name} = {got}, expected {value}"
