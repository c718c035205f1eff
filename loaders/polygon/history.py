"""Polygon's historical endpoints (shared/spec/history.md): the contracts listed on a day, daily
bars, the Treasury curve, dividends and open interest, over the source's own HTTP (helpers)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from datetime import UTC, date, datetime
from typing import Any
from urllib.parse import quote

import pyarrow as pa
import requests
from dlt.sources.helpers.rest_client.auth import BearerTokenAuth

from ..trading_calendar import NEW_YORK
from .configuration import PolygonConfiguration
from .helpers import (
    ChainClient,
    ProviderError,
    RateLimiter,
    _provider_message,
    _unreachable,
    one_line,
)
from .rows import ARROW_SCHEMA, SymbolFetchError

log = logging.getLogger(__name__)

CONTRACTS_PATH = "v3/reference/options/contracts"
AGGS_PATH = "v2/aggs/ticker/{ticker}/range/1/day/{start}/{end}"
TREASURY_PATH = "fed/v1/treasury-yields"
DIVIDENDS_PATH = "v3/reference/dividends"
OPEN_INTEREST_PATH = "options/v1/open-interest"
CONTRACTS_LIMIT = 1000  # the reference endpoint's maximum
AGGS_LIMIT = 50_000  # a whole range of daily bars in one request
MISSING = (403, 404)  # not in the plan, or no such data: what "unavailable" means here


class HistoryRefused(SymbolFetchError):
    """An endpoint answered 403 or 404 (not in the plan, or no such data). From the reference or
    the aggregates, what it covers fails; from dividends or open interest, they are unknown."""


def bare_root(symbol: str) -> str:
    """The underlying as the reference endpoints name it: index options under the bare root
    (I:SPX -> SPX), equities as they are."""
    return symbol[2:] if symbol.startswith("I:") else symbol


def occ_root(ticker: str) -> str:
    """The OCC root of an option ticker: O:SPXW251219C06000000 -> SPXW."""
    return ticker[2:-15]


class HistoryClient(ChainClient):
    """The history endpoints of the configured origin, with the source's session, retries and rate
    limit (ChainClient's). Thread-safe; counts its requests for a progress line."""

    def __init__(self, config: PolygonConfiguration, pool_size: int = 4, limiter: RateLimiter | None = None,
                 parser: Executor | None = None, on_request: Callable[[], None] | None = None) -> None:
        super().__init__(config, None, pool_size, limiter, parser)
        # As the official clients send it: a header, never in a URL (URLs end up in access logs);
        # every URL stays on the configured origin (json_pages pins next_url to it).
        self._auth = BearerTokenAuth(token=config.polygon_api_key)
        self._on_request = on_request
        self.requests = 0
        self._count_lock = threading.Lock()

    def _get(self, url: str, params: dict[str, Any] | None) -> requests.Response:
        with self._count_lock:
            self.requests += 1
        if self._on_request is not None:
            self._on_request()
        return super()._get(url, params)

    def results(self, label: str, path: str, params: dict[str, Any]) -> list[Any]:
        """Every page's `results`, concatenated.

        Raises:
            HistoryRefused: 403 or 404, with the provider's message (the caller decides what an
                unavailable endpoint means).
            SymbolFetchError: any other failure of this request (after retries).
            ProviderError: 401, or the origin cannot be reached: nothing can succeed.
        """
        found: list[Any] = []
        try:
            for body in self.json_pages(label, path, params):
                results = body.get("results") or []
                if not isinstance(results, list):
                    raise SymbolFetchError(f"unreadable response from /{path.split('/range/')[0]}: no list of results")
                found += results
        except requests.HTTPError as exc:
            self._refused(exc.response, path)
        except requests.ConnectionError as exc:
            if _unreachable(exc):
                raise ProviderError(f"{self.origin} is unreachable") from None
            raise SymbolFetchError(f"connection broken after retries: {one_line(str(exc))}") from None
        except (requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            raise SymbolFetchError(f"{type(exc).__name__} after retries on /{_endpoint(path)}") from None
        return found

    def _refused(self, response: requests.Response | None, path: str) -> None:
        status = response.status_code if response is not None else 0
        message = one_line(_provider_message(response)) if response is not None else ""
        endpoint = "/" + _endpoint(path)
        if status == 401:
            raise ProviderError(f"{self.origin} answered HTTP 401 ({message or 'unauthorised'}): "
                                "check POLYGON_API_KEY") from None
        if status in MISSING:
            raise HistoryRefused(f"HTTP {status} from {endpoint}: {message or 'refused'}") from None
        raise SymbolFetchError(f"HTTP {status} from {endpoint}" + (f": {message}" if message else "")) from None

    def contracts(self, symbol: str, day: date) -> list[dict[str, Any]]:
        """The contracts listed on `day` that had not expired by then (expired since included)."""
        params = {"underlying_ticker": bare_root(symbol), "as_of": day.isoformat(),
                  "expiration_date.gte": day.isoformat(), "limit": CONTRACTS_LIMIT}
        return self.results(symbol, CONTRACTS_PATH, params)

    def bars(self, ticker: str, start: date, end: date, label: str) -> list[dict[str, Any]]:
        """Unadjusted daily bars of a ticker (an option or the underlying), oldest first; no
        trade on a day means no bar."""
        path = AGGS_PATH.format(ticker=quote(ticker, safe=":"), start=start.isoformat(), end=end.isoformat())
        params = {"adjusted": "false", "sort": "asc", "limit": AGGS_LIMIT}
        return self.results(label, path, params)

    def treasury(self, start: date, end: date) -> list[dict[str, Any]]:
        """The Treasury curves of [start, end] (yields in percent), oldest first."""
        params = {"date.gte": start.isoformat(), "date.lte": end.isoformat(), "limit": AGGS_LIMIT, "sort": "date"}
        curves = self.results("treasury", TREASURY_PATH, params)
        return sorted((c for c in curves if isinstance(c, dict) and c.get("date")), key=lambda c: c["date"])

    def dividends(self, symbol: str) -> list[dict[str, Any]]:
        """The underlying's cash dividends (HistoryRefused when the plan lacks the endpoint)."""
        return self.results(symbol, DIVIDENDS_PATH, {"ticker": bare_root(symbol), "limit": 1000})

    def open_interest(self, root: str, start: date, end: date, label: str) -> list[dict[str, Any]]:
        """OPRA's open interest per contract and session of [start, end] for one OCC root
        (HistoryRefused when the plan lacks the endpoint)."""
        params = {"root": root, "date.gte": start.isoformat(), "date.lte": end.isoformat(), "limit": AGGS_LIMIT}
        return self.results(label, OPEN_INTEREST_PATH, params)


def _endpoint(path: str) -> str:
    """A path without its ticker and dates, for messages: v2/aggs/ticker/... -> v2/aggs."""
    return "v2/aggs" if path.startswith("v2/aggs/") else path


def chain_rows(table: pa.Table, ticker_id: str, snapshot_time: datetime) -> pa.Table:
    """reconstruct_day's table as options_chains rows of ARROW_SCHEMA (what it does not know,
    such as the quote's time or fmv, null)."""
    n = table.num_rows
    arrays = []
    for column in ARROW_SCHEMA:
        if column.name == "time":
            arrays.append(pa.array([snapshot_time] * n, column.type))
        elif column.name == "ticker_id":
            arrays.append(pa.array([ticker_id] * n, column.type))
        elif column.name in table.column_names:
            arrays.append(table.column(column.name).cast(column.type))
        else:
            arrays.append(pa.nulls(n, column.type))
    return pa.Table.from_arrays(arrays, schema=ARROW_SCHEMA)


def bar_session(bar: Mapping[str, Any], ticker: str) -> tuple[date, tuple[Any, Any, Any]]:
    """The session a daily bar is for (its `t`, Unix ms at the start of the day in New York) and
    (c, v, t) as sent, all a reconstruction needs (reconstruct_day checks them).

    Raises:
        SymbolFetchError: the bar has no usable `t`.
    """
    start_ms = bar.get("t") if isinstance(bar, Mapping) else None
    if type(start_ms) is not int:
        raise SymbolFetchError(f"a daily bar of {ticker} has no time t")
    session = datetime.fromtimestamp(start_ms / 1000, UTC).astimezone(NEW_YORK).date()
    return session, (bar.get("c"), bar.get("v", 0), start_ms)
