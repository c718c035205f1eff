"""Publishing the metrics mart: its JSON upserted into daily_snapshots, one ERROR document for
each row that cannot be written."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import date
from typing import Any

import psycopg2
from psycopg2 import sql

from . import db as dbmod

log = logging.getLogger(__name__)

# Writes only when the JSON changed, so a re-run of the same model writes nothing.
_PUBLISH = """
insert into daily_snapshots
    (time, ticker_id, volatility_metrics_json, metrics_model_version, metrics_updated_at)
select mart.snapshot_at, mart.ticker_id,
       mart.volatility_metrics_json || jsonb_build_object('model_version', %(version)s::text),
       %(version)s, now()
from {grid} as grid
join {mart} as mart using (ticker_id, as_of_date)
where grid.is_published {only_one}
on conflict (time, ticker_id) do update set
    volatility_metrics_json = excluded.volatility_metrics_json,
    metrics_model_version = excluded.metrics_model_version,
    metrics_updated_at = excluded.metrics_updated_at
where daily_snapshots.volatility_metrics_json::text
      is distinct from excluded.volatility_metrics_json::text
  {keep_existing}
"""
_KEEP_EXISTING = ("and jsonb_typeof(coalesce(daily_snapshots.volatility_metrics_json, 'null'))"
                  " = 'null'")

_ERROR_UPSERT = """
insert into daily_snapshots
    (time, ticker_id, volatility_metrics_json, metrics_model_version, metrics_updated_at)
values (%(time)s, %(ticker_id)s, %(doc)s::jsonb, %(version)s, now())
on conflict (time, ticker_id) do update set
    volatility_metrics_json = excluded.volatility_metrics_json,
    metrics_model_version = excluded.metrics_model_version,
    metrics_updated_at = excluded.metrics_updated_at
"""


@dataclass
class Published:
    """One (ticker, date) the run published."""

    ticker_id: str
    symbol: str
    as_of: date
    snapshot_at: Any
    status: str
    diagnostics: list[str]
    document: dict[str, Any]
    error: str | None = None


def error_document(document: dict[str, Any], reason: str) -> dict[str, Any]:
    """The spec's ERROR shape from a computed document: every metric null, one diagnostic."""
    short = " ".join(reason.split())[:120]
    return document | {
        "status": "ERROR",
        "metrics": dict.fromkeys(document.get("metrics", {})),
        "diagnostics": [f"error:{short}"],
    }


def _published_rows(cur: Any, grid: sql.Composable, mart: sql.Composable) -> list[Published]:
    cur.execute(sql.SQL(
        "select mart.ticker_id::text, mart.symbol, mart.as_of_date, mart.snapshot_at, mart.status,"
        " mart.diagnostics, mart.volatility_metrics_json::text"
        " from {grid} as grid join {mart} as mart using (ticker_id, as_of_date)"
        " where grid.is_published order by mart.as_of_date, mart.symbol"
    ).format(grid=grid, mart=mart))
    return [Published(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6])) for r in cur.fetchall()]


def publish(database: dbmod.Database, grid_relation: str, mart_relation: str, version: str,
            fill_missing: bool) -> list[Published]:
    """Upsert the JSON of every published (ticker, date) into daily_snapshots.

    Only volatility_metrics_json and its bookkeeping columns are written, and only when the JSON
    changed (re-runs write nothing); with fill_missing, existing JSON is never replaced. All rows
    go in one statement; if that fails, row by row, so that one ticker's failure becomes its
    ERROR document and the rest of the batch lands.

    Args:
        database: where daily_snapshots lives.
        grid_relation: the run's (ticker, date) grid with `is_published` (int_options_snapshots).
        mart_relation: the metrics mart (volatility_metrics).
        version: the model version stamped on every document.
        fill_missing: only fill rows whose JSON is still null.
    """
    grid, mart = sql.SQL(grid_relation), sql.SQL(mart_relation)
    keep = sql.SQL(_KEEP_EXISTING if fill_missing else "")
    statement = sql.SQL(_PUBLISH)
    with database.connect() as conn, conn.cursor() as cur:
        rows = _published_rows(cur, grid, mart)
    try:
        with database.connect() as conn, conn.cursor() as cur:
            cur.execute(statement.format(grid=grid, mart=mart, only_one=sql.SQL(""), keep_existing=keep),
                        {"version": version})
        return rows
    except psycopg2.Error as exc:
        log.warning("publishing all rows at once failed (%s); publishing ticker by ticker",
                    _first_line(exc))
    one = statement.format(grid=grid, mart=mart, keep_existing=keep,
                           only_one=sql.SQL("and mart.ticker_id = %(ticker_id)s and mart.as_of_date = %(as_of)s"))
    with database.connect(autocommit=True) as conn, conn.cursor() as cur:
        for row in rows:
            try:
                cur.execute(one, {"version": version, "ticker_id": row.ticker_id, "as_of": row.as_of})
            except psycopg2.Error as exc:
                row.error = _first_line(exc)
                row.status = "ERROR"
                row.document = error_document(row.document, row.error)
                row.diagnostics = row.document["diagnostics"]
                log.error("%s %s: publishing failed: %s", row.symbol, row.as_of, row.error)
                try:
                    cur.execute(_ERROR_UPSERT, {
                        "time": row.snapshot_at, "ticker_id": row.ticker_id, "version": version,
                        "doc": json.dumps(row.document | {"model_version": version}, sort_keys=True),
                    })
                except psycopg2.Error as again:
                    log.error("%s %s: cannot record the ERROR status either: %s",
                              row.symbol, row.as_of, _first_line(again))
    return rows


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
