"""Rows: a snapshot page parsed and normalised into Arrow rows of options_chains, a chain's result, its dedupe."""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from dlt.common.json import json as _dlt_json

loadb = _dlt_json.loadb  # orjson when available: a page is ~200 kB of JSON


class SymbolFetchError(RuntimeError):
    """One symbol's chain could not be fetched or read; the other symbols go on."""


# --- Arrow schema and normalisation -----------------------------------------------------------

ARROW_SCHEMA = pa.schema([
    pa.field("time", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("ticker_id", pa.string(), nullable=False),
    pa.field("contract_ticker", pa.string(), nullable=False),
    pa.field("expiration_date", pa.date32(), nullable=False),
    pa.field("strike_price", pa.float64(), nullable=False),
    pa.field("option_type", pa.string(), nullable=False),
    pa.field("implied_volatility", pa.float64()),
    pa.field("delta", pa.float64()),
    pa.field("gamma", pa.float64()),
    pa.field("theta", pa.float64()),
    pa.field("vega", pa.float64()),
    pa.field("open_interest", pa.int64()),
    pa.field("volume", pa.int64()),
    pa.field("bid", pa.float64()),
    pa.field("ask", pa.float64()),
    pa.field("last", pa.float64()),
    pa.field("underlying_price", pa.float64()),
    pa.field("underlying_symbol", pa.string()),
    pa.field("exercise_style", pa.string()),
    pa.field("shares_per_contract", pa.int64()),
    pa.field("break_even_price", pa.float64()),
    pa.field("fmv", pa.float64()),
    pa.field("quote_updated_at", pa.timestamp("us", tz="UTC")),
    pa.field("trade_at", pa.timestamp("us", tz="UTC")),
    pa.field("day_updated_at", pa.timestamp("us", tz="UTC")),
    # How the row was obtained (0004): 'snapshot' here, 'reconstructed' for a past day rebuilt from
    # history. Loaded with every row, so a snapshot stored over a reconstruction says so.
    pa.field("source", pa.string(), nullable=False),
])
# Parsed per contract: all but time and ticker_id (constant per symbol) and source (per page).
_VALUE_COLUMNS = [f.name for f in ARROW_SCHEMA][2:-1]
_CONTRACT_TYPES = {"call": "C", "put": "P"}


class _Reject(ValueError):
    """A contract that cannot be stored; the message is the reason counted for its symbol."""


_EMPTY: dict[str, Any] = {}


def _obj(contract: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = contract.get(key)
    if type(value) is dict:
        return value
    if value is None:
        return _EMPTY
    if not isinstance(value, Mapping):
        raise _Reject(f"unparseable {key}")
    return value


def _number(value: Any, name: str) -> float | None:
    kind = type(value)  # fast paths first: this runs ~15 times per contract
    if kind is float:
        if value - value == 0.0:  # finite (inf - inf and nan - nan are nan)
            return value
        raise _Reject(f"unparseable {name}")
    if kind is int:
        return float(value)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _Reject(f"unparseable {name}")
    try:
        number = float(value)
    except ValueError:
        raise _Reject(f"unparseable {name}") from None
    if not math.isfinite(number):
        raise _Reject(f"unparseable {name}")
    return number


def _integer(value: Any, name: str) -> int | None:
    number = _number(value, name)
    if number is None:
        return None
    # bigint columns: a value past 64 bits is rejected here, not an OverflowError for the chain.
    if not number.is_integer() or abs(number) >= 2.0**63:
        raise _Reject(f"unparseable {name}")
    return int(number)


# Plausible Unix nanoseconds: 1973-03-03 to 2262. Milliseconds or microseconds of any date before
# year 5000 fall below; one recorded real response carries milliseconds.
_NANOS_RANGE = (10**17, 2**63)


def _nanos_to_micros(value: Any) -> int | None:
    """Polygon timestamps are Unix nanoseconds; PostgreSQL keeps microseconds. A value that is not
    a plausible nanosecond time (milliseconds, a float, a string) is null: the contract is kept."""
    if type(value) is not int or not _NANOS_RANGE[0] <= value < _NANOS_RANGE[1]:
        return None
    return value // 1000


def _text(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if type(value) is not str:
        raise _Reject(f"unparseable {name}")
    return value.strip() or None


def _contract_row(contract: Any, expirations: dict[str, date]) -> tuple[Any, ...]:
    """One contract as a tuple in _VALUE_COLUMNS order, or _Reject."""
    if not isinstance(contract, Mapping):
        raise _Reject("not an object")
    details = _obj(contract, "details")
    ticker = _text(details.get("ticker"), "ticker")
    if ticker is None:
        raise _Reject("missing ticker")
    raw_expiration = details.get("expiration_date")
    if raw_expiration is None:
        raise _Reject("missing expiration_date")
    expiration = expirations.get(raw_expiration) if isinstance(raw_expiration, str) else None
    if expiration is None:
        try:
            expiration = expirations[raw_expiration] = date.fromisoformat(raw_expiration)
        except (TypeError, ValueError):
            raise _Reject("unparseable expiration_date") from None
    strike = _number(details.get("strike_price"), "strike_price")
    if strike is None:
        raise _Reject("missing strike_price")
    if strike <= 0:
        raise _Reject("unparseable strike_price")
    raw_type = details.get("contract_type")
    option_type = _CONTRACT_TYPES.get(raw_type.lower()) if isinstance(raw_type, str) else None
    if option_type is None:
        raise _Reject("missing contract_type" if raw_type is None else "unknown contract_type")

    greeks, day = _obj(contract, "greeks"), _obj(contract, "day")
    quote_, trade = _obj(contract, "last_quote"), _obj(contract, "last_trade")
    underlying = _obj(contract, "underlying_asset")
    # Index underlyings (I:SPX) report `value` instead of `price`.
    underlying_price = underlying.get("price")
    if underlying_price is None:
        underlying_price = underlying.get("value")
    return (
        ticker, expiration, strike, option_type,
        _number(contract.get("implied_volatility"), "implied_volatility"),
        _number(greeks.get("delta"), "delta"),
        _number(greeks.get("gamma"), "gamma"),
        _number(greeks.get("theta"), "theta"),
        _number(greeks.get("vega"), "vega"),
        _integer(contract.get("open_interest"), "open_interest"),
        _integer(day.get("volume"), "volume"),
        _number(quote_.get("bid"), "bid"),
        _number(quote_.get("ask"), "ask"),
        _number(trade.get("price"), "last"),
        _number(underlying_price, "underlying_price"),
        _text(underlying.get("ticker"), "underlying_asset.ticker"),
        _text(details.get("exercise_style"), "exercise_style"),
        _integer(details.get("shares_per_contract"), "shares_per_contract"),
        _number(contract.get("break_even_price"), "break_even_price"),
        _number(contract.get("fmv"), "fmv"),
        _nanos_to_micros(quote_.get("last_updated")),
        _nanos_to_micros(trade.get("sip_timestamp")),
        _nanos_to_micros(day.get("last_updated")),
    )


def normalise_page(
    results: Sequence[Any], ticker_id: str, snapshot_time: datetime
) -> tuple[pa.Table, Counter[str]]:
    """Turn one page of snapshot results into an Arrow table of options_chains rows.

    Args:
        results: the page's `results` (Polygon contract objects).
        ticker_id: the underlying's `tickers.id`.
        snapshot_time: the snapshot identity stored in `time`.

    Returns:
        The valid contracts as a table with ARROW_SCHEMA, and the rejected ones counted by reason.
    """
    rows: list[tuple[Any, ...]] = []
    rejected: Counter[str] = Counter()
    expirations: dict[str, date] = {}
    for contract in results:
        try:
            rows.append(_contract_row(contract, expirations))
        except _Reject as reason:
            rejected[str(reason)] += 1
    columns = list(zip(*rows, strict=True)) if rows else [() for _ in _VALUE_COLUMNS]
    stamp = snapshot_time.astimezone(UTC)
    arrays = [
        pa.array([stamp] * len(rows), ARROW_SCHEMA.field("time").type),
        pa.array([ticker_id] * len(rows), pa.string()),
    ] + [pa.array(values, ARROW_SCHEMA.field(name).type) for name, values in zip(_VALUE_COLUMNS, columns, strict=True)]
    arrays.append(pa.array(["snapshot"] * len(rows), pa.string()))
    return pa.Table.from_arrays(arrays, schema=ARROW_SCHEMA), rejected


def dedupe_pages(tables: Sequence[pa.Table], already: set[str] | None = None) -> tuple[list[pa.Table], int]:
    """Keep one row per contract ticker: a later page (or later row) wins over an earlier one.
    Runs once per symbol, as its chain goes into a load (options_chains).

    Args:
        tables: a symbol's pages in fetch order.
        already: contract tickers another symbol already emitted in this load; dropped here
            (a MERGE may not touch a row twice). Updated with this symbol's tickers.

    Returns:
        The filtered pages as one table (none if empty) and the number of rows dropped.
    """
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return [], 0
    table = pa.concat_tables(tables)
    tickers = table.column("contract_ticker")
    unique = pc.unique(tickers)
    keep: Any = None  # every row, unless a ticker repeats (rare: most chains have none)
    if len(unique) < table.num_rows:
        # The last row of each ticker, found in Arrow (this runs for every contract fetched).
        position = pa.table({"ticker": tickers, "row": pa.array(range(table.num_rows), pa.int64())})
        last = position.group_by("ticker", use_threads=False).aggregate([("row", "max")]).column("row_max")
        keep = pc.is_in(pa.array(range(table.num_rows), pa.int64()), value_set=last)
    if already is not None:
        # Checked against this symbol's tickers only: `already` grows with the load, and turning
        # it into an Arrow array for every symbol made the check quadratic in the load's size.
        names = unique.to_pylist()
        taken = [t for t in names if t in already]
        if taken:
            fresh = pc.invert(pc.is_in(tickers, value_set=pa.array(taken, pa.string())))
            keep = fresh if keep is None else pc.and_(keep, fresh)
        already.update(names)
    if keep is None:
        return [table], 0
    kept = table if pc.all(keep).as_py() else table.filter(keep)
    return [kept] if kept.num_rows else [], table.num_rows - kept.num_rows


@dataclass
class ParsedPage:
    """One page read: its valid contracts as an ARROW_SCHEMA table, the rejected ones by reason."""

    table: pa.Table
    rejected: Counter[str]
    cpu_s: float = 0.0  # CPU time spent parsing it, wherever that ran


def parse_page(content: bytes, content_type: str | None, ticker_id: str,
               snapshot_time: datetime) -> tuple[ParsedPage, Any]:
    """A page's body as a ParsedPage and its `next_url`. A plain function of bytes, so that a
    process pool can run it (ChainClient's `parser`).

    Raises:
        SymbolFetchError: the body is not JSON or has no list of results.
    """
    started = time.thread_time()
    try:
        body = loadb(content)
    except ValueError:
        raise SymbolFetchError(f"unreadable response: not JSON ({content_type})") from None
    if not isinstance(body, dict) or not isinstance(body.get("results", []) or [], list):
        raise SymbolFetchError("unreadable response: no list of results")
    table, rejected = normalise_page(body.get("results") or [], ticker_id, snapshot_time)
    return ParsedPage(table, rejected, time.thread_time() - started), body.get("next_url")


_NEXT_URL_KEY = b'"next_url":"'


def peek_next_url(content: bytes) -> str | None:
    """The `next_url` of a page read off its raw bytes, without parsing the page; None when it
    is not there in the compact form the API writes (`"next_url":"..."`, no escapes in the
    value), and the caller waits for the parse. A string value cannot hide the key: its quotes
    would be escaped. The caller checks the value against the parsed page's."""
    at = content.rfind(_NEXT_URL_KEY)
    if at < 0:
        return None
    start = at + len(_NEXT_URL_KEY)
    end = content.find(b'"', start)
    value = content[start:end] if end > start else b""
    if not value or b"\\" in value:
        return None
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        return None


@dataclass
class ChainResult:
    """One symbol's fetch for one snapshot: its Arrow pages and what happened."""

    symbol: str
    ticker_id: str
    tables: list[pa.Table] = field(default_factory=list)
    snapshot_time: datetime | None = None  # the rows' `time`
    pages: int = 0
    contracts: int = 0  # rows in `tables`: as fetched, then as stored once deduplicated
    rejected: int = 0
    reject_reasons: Counter[str] = field(default_factory=Counter)
    error: str | None = None
    fatal: bool = False  # the provider failed for everyone (the run stops)
    attempted: bool = True
    elapsed: float = 0.0
    parse_cpu_s: float = 0.0  # CPU time of parsing its pages (in the parser's processes, if any)
    source: str = "snapshot"  # how the provider obtained the rows (options_chains.source)
    # A reconstructed day's IV counts: contracts with an IV, and those without one by reason.
    with_iv: int | None = None
    not_inverted: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    def count(self) -> None:
        """Set contracts and rejected from the pages held."""
        self.rejected = sum(self.reject_reasons.values())
        self.contracts = sum(table.num_rows for table in self.tables)
