"""The yardstick for ingestion: a plain loader as one would write it by hand.

requests in `concurrency` threads (one session per thread), orjson, each contract flattened to the
same options_chains columns the project writes, then per batch of symbols one COPY into a temp
table and one INSERT ... ON CONFLICT (time, contract_ticker) DO UPDATE. Fetching and loading
take turns (a batch is fetched, then loaded): nothing overlaps. No ledger, lifecycle or
validation beyond what the columns need.
"""

from __future__ import annotations

import csv
import io
import resource
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime
from multiprocessing.connection import Connection
from typing import Any

import orjson
import psycopg2
import requests

BATCH_SYMBOLS = 50  # as `kapman ingest` (LOAD_BATCH_SYMBOLS)
COLUMNS = (
    "time", "ticker_id", "contract_ticker", "expiration_date", "strike_price", "option_type",
    "implied_volatility", "delta", "gamma", "theta", "vega", "open_interest", "volume", "bid", "ask",
    "last", "underlying_price", "underlying_symbol", "exercise_style", "shares_per_contract",
    "break_even_price", "fmv", "quote_updated_at", "trade_at", "day_updated_at",
)
_NS = ("quote_updated_at", "trade_at", "day_updated_at")  # Unix nanoseconds in the JSON
# Staged as text (bigint for the nanosecond stamps); the INSERT casts to the table's types.
STAGE = "create temp table stage (" + ", ".join(
    f"{c} bigint" if c in _NS else f"{c} text" for c in COLUMNS) + ")"
_TARGETS = ", ".join(COLUMNS)
_SELECT = ", ".join(
    f"to_timestamp({c} / 1e9)" if c in _NS else f"{c}::timestamptz" if c == "time" else
    f"{c}::uuid" if c == "ticker_id" else f"{c}::date" if c == "expiration_date" else
    f"{c}::numeric" if c in ("strike_price", "bid", "ask", "last", "underlying_price",
                             "break_even_price", "fmv") else
    f"{c}::double precision" if c in ("implied_volatility", "delta", "gamma", "theta", "vega") else
    f"{c}::bigint" if c in ("open_interest", "volume") else
    f"{c}::integer" if c == "shares_per_contract" else c
    for c in COLUMNS)
UPSERT = (f"insert into options_chains ({_TARGETS}) select {_SELECT} from stage"  # noqa: S608 (constants)
           " on conflict (time, contract_ticker) do update set "
           + ", ".join(f"{c} = excluded.{c}" for c in COLUMNS[1:] if c != "contract_ticker"))
COPY_STAGE = f"copy stage ({_TARGETS}) from stdin with (format csv)"
_EMPTY: dict[str, Any] = {}


def flatten(contracts: Iterable[dict[str, Any]], stamp: str, ticker_id: str, out: io.StringIO) -> int:
    """Write the contracts as CSV rows of COLUMNS; returns how many."""
    writer = csv.writer(out)
    rows = 0
    for c in contracts:
        d = c["details"]
        g, day = c.get("greeks") or _EMPTY, c.get("day") or _EMPTY
        q, t = c.get("last_quote") or _EMPTY, c.get("last_trade") or _EMPTY
        u = c.get("underlying_asset") or _EMPTY
        price = u.get("price")
        writer.writerow((
            stamp, ticker_id, d["ticker"], d["expiration_date"], d["strike_price"],
            "C" if d["contract_type"] == "call" else "P", c.get("implied_volatility"),
            g.get("delta"), g.get("gamma"), g.get("theta"), g.get("vega"), c.get("open_interest"),
            day.get("volume"), q.get("bid"), q.get("ask"), t.get("price"),
            u.get("value") if price is None else price, u.get("ticker"), d.get("exercise_style"),
            d.get("shares_per_contract"), c.get("break_even_price"), c.get("fmv"),
            q.get("last_updated"), t.get("sip_timestamp"), day.get("last_updated"),
        ))
        rows += 1
    return rows


class PlainLoader:
    """Fetch, flatten and upsert whole chains; see the module docstring."""

    def __init__(self, base_url: str, api_key: str, dsn: str, concurrency: int) -> None:
        self.base_url, self.api_key, self.dsn, self.concurrency = base_url, api_key, dsn, concurrency
        self._local = threading.local()
        self.pages = 0

    def _session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def fetch(self, symbol: str, ticker_id: str, stamp: str) -> tuple[str, int, int]:
        """One chain as CSV text; (csv, rows, pages)."""
        session, out = self._session(), io.StringIO()
        url: str | None = f"{self.base_url}/v3/snapshot/options/{symbol}"
        params: dict[str, Any] = {"limit": 250, "apiKey": self.api_key}
        rows = pages = 0
        while url:
            response = session.get(url, params=params, timeout=60)
            response.raise_for_status()
            body = orjson.loads(response.content)
            rows += flatten(body["results"], stamp, ticker_id, out)
            pages += 1
            url, params = body.get("next_url"), {"apiKey": self.api_key}
        return out.getvalue(), rows, pages

    def run(self, symbols: Mapping[str, str], snapshot: datetime) -> dict[str, float]:
        """Load every symbol's chain under `snapshot`; rows, pages and seconds."""
        stamp = snapshot.astimezone(UTC).isoformat()
        started = time.perf_counter()
        rows = pages = 0
        items = list(symbols.items())
        with psycopg2.connect(self.dsn) as conn, conn.cursor() as cur, \
                ThreadPoolExecutor(self.concurrency) as pool:
            cur.execute(STAGE)
            for start in range(0, len(items), BATCH_SYMBOLS):
                batch = items[start:start + BATCH_SYMBOLS]
                chains = list(pool.map(lambda item: self.fetch(item[0], item[1], stamp), batch))
                buffer = io.StringIO("".join(text for text, _, _ in chains))
                cur.execute("truncate stage")
                cur.copy_expert(COPY_STAGE, buffer)
                cur.execute(UPSERT)
                conn.commit()
                rows += sum(n for _, n, _ in chains)
                pages += sum(p for _, _, p in chains)
        return {"rows": rows, "pages": pages, "seconds": time.perf_counter() - started}


def run_in_child(conn: Connection, base_url: str, api_key: str, dsn: str, concurrency: int,
                 symbols: dict[str, str], day: date, snapshot: datetime) -> None:
    """multiprocessing target: run the loader, send its figures and this process's peak RSS."""
    figures = PlainLoader(base_url, api_key, dsn, concurrency).run(symbols, snapshot)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    figures["peak_rss_mb"] = usage.ru_maxrss / 1024
    figures["cpu_s"] = usage.ru_utime + usage.ru_stime
    conn.send(figures)
