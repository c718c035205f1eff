"""HTTP, paging, retries and normalisation of Polygon option-chain snapshots into Arrow pages."""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.compute as pc
import requests
from dlt.common.configuration.specs import RuntimeConfiguration
from dlt.common.json import json as _dlt_json
from dlt.common.jsonpath import compile_path
from dlt.sources.helpers.requests.retry import retry_if_status, wait_exponential_retry_after
from dlt.sources.helpers.requests.session import Session
from dlt.sources.helpers.rest_client import RESTClient
from dlt.sources.helpers.rest_client.auth import APIKeyAuth
from dlt.sources.helpers.rest_client.paginators import JSONLinkPaginator
from requests.adapters import HTTPAdapter
from tenacity import (
    RetryCallState,
    Retrying,
    retry_any,
    retry_if_exception_type,
    stop_after_attempt,
)
from tenacity.stop import stop_base

from . import settings

log = logging.getLogger(__name__)
loadb = _dlt_json.loadb  # orjson when available: a page is ~200 kB of JSON

# Compiled once: RESTClient would parse a string selector again for every page (~2 ms each).
_RESULTS = compile_path("results")
_RETRY_EXCEPTIONS = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


class ProviderError(RuntimeError):
    """The provider refuses or cannot serve anyone (401/403, unreachable): the whole run stops."""


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
])
_VALUE_COLUMNS = [f.name for f in ARROW_SCHEMA][2:]  # time and ticker_id are constant per symbol
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


# Plausible Unix nanoseconds: 2000-01-01 to 2100-01-01. A recorded response carries milliseconds
# (1672434000000): read as nanoseconds it would be January 1970, so it is dropped, not stored.
_NANOS_RANGE = (946_684_800 * 10**9, 4_102_444_800 * 10**9)


def _nanos_to_micros(value: Any, name: str) -> int | None:
    """Polygon timestamps are Unix nanoseconds; PostgreSQL keeps microseconds. A value that is
    not a plausible nanosecond time (milliseconds, a float, a string) is None: the contract stays."""
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
        _nanos_to_micros(quote_.get("last_updated"), "last_quote.last_updated"),
        _nanos_to_micros(trade.get("sip_timestamp"), "last_trade.sip_timestamp"),
        _nanos_to_micros(day.get("last_updated"), "day.last_updated"),
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
    return pa.Table.from_arrays(arrays, schema=ARROW_SCHEMA), rejected


def dedupe_pages(tables: Sequence[pa.Table], already: set[str] | None = None) -> tuple[list[pa.Table], int]:
    """Keep one row per contract ticker: a later page (or later row) wins over an earlier one.

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
    # The last row of each ticker, found in Arrow (this runs for every contract fetched).
    position = pa.table({"ticker": tickers, "row": pa.array(range(table.num_rows), pa.int64())})
    last = position.group_by("ticker", use_threads=False).aggregate([("row", "max")]).column("row_max")
    keep = pc.is_in(pa.array(range(table.num_rows), pa.int64()), value_set=last)
    if already is not None:
        # Checked against this symbol's tickers only: `already` grows with the load, and turning
        # it into an Arrow array for every symbol made the check quadratic in the load's size.
        unique = pc.unique(tickers).to_pylist()
        taken = [t for t in unique if t in already]
        if taken:
            keep = pc.and_(keep, pc.invert(pc.is_in(tickers, value_set=pa.array(taken, pa.string()))))
        already.update(unique)
    kept = table if pc.all(keep).as_py() else table.filter(keep)
    return [kept] if kept.num_rows else [], table.num_rows - kept.num_rows


# --- HTTP: origin pinning, retries, paging ------------------------------------------------------

def sanitize(text: str, api_key: str | None) -> str:
    """One line without the key, whatever library produced the text."""
    if api_key:
        text = text.replace(api_key, "***")
    text = re.sub(r"(?i)(apikey=)[^&\s'\"]+", r"\1***", text)
    return " ".join(text.split())[:400]


def pin_next_url(next_url: str, base_url: str) -> str:
    """The URL to follow for a `next_url`, always on the configured origin.

    A next_url on another origin (Polygon answers with api.polygon.io even when reached through
    another host) is rewritten onto the configured origin if it stays on the snapshot endpoint,
    and refused otherwise: the key is only ever sent to the configured origin. Any `apiKey` in the
    next_url is dropped (auth adds ours).

    Raises:
        SymbolFetchError: the next_url leaves the snapshot endpoint or is not http(s).
    """
    base = urlsplit(base_url)
    parts = urlsplit(next_url)
    if parts.scheme not in ("http", "https", ""):
        raise SymbolFetchError(f"refused next_url with scheme {parts.scheme!r}")
    base_path = base.path.rstrip("/")
    path = parts.path
    if base_path and path.startswith(base_path + "/"):
        path = path[len(base_path):]
    if not path.startswith(settings.SNAPSHOT_PATH_PREFIX):
        raise SymbolFetchError(f"refused next_url outside the snapshot endpoint: {parts.netloc}{parts.path}")
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
                       if k.lower() != settings.API_KEY_PARAM.lower()])
    if parts.netloc and (parts.scheme, parts.netloc) != (base.scheme, base.netloc):
        log.debug("next_url on %s://%s rewritten onto the configured origin %s://%s",
                  parts.scheme, parts.netloc, base.scheme, base.netloc)
    return urlunsplit((base.scheme, base.netloc, base_path + path, query, ""))


class PinnedLinkPaginator(JSONLinkPaginator):
    """Follows `next_url` until it is absent, only ever on the configured origin, never in a loop."""

    def __init__(self, base_url: str, max_pages: int = 20_000) -> None:
        super().__init__(next_url_path="next_url")
        self.base_url = base_url
        self.max_pages = max_pages
        self._followed: set[str] = set()

    def update_state(self, response: requests.Response, data: list[Any] | None = None) -> None:
        super().update_state(response, data)
        if not self._next_reference:
            self._next_reference = None  # "" or null end the chain like an absent next_url

    def update_request(self, request: requests.Request) -> None:
        if self._next_reference:
            url = pin_next_url(self._next_reference, self.base_url)
            if url in self._followed or len(self._followed) >= self.max_pages:
                raise SymbolFetchError("next_url repeats itself: pagination does not end")
            self._followed.add(url)
            self._next_reference = url
        super().update_request(request)


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: per request and per symbol."""

    max_attempts: int = settings.MAX_ATTEMPTS
    budget_per_symbol: int = settings.RETRY_BUDGET_PER_SYMBOL
    backoff_factor: float = settings.BACKOFF_FACTOR
    max_delay: float = settings.MAX_RETRY_DELAY
    connect_timeout: float = settings.CONNECT_TIMEOUT
    read_timeout: float = settings.READ_TIMEOUT


class RateLimiter:
    """A plan's request limit kept on our side: requests start at least 60/requests_per_minute
    seconds apart, whichever thread sends them (retries included). Thread-safe: share one per key."""

    def __init__(self, requests_per_minute: float) -> None:
        if not requests_per_minute > 0:
            raise ValueError(f"requests_per_minute must be > 0, not {requests_per_minute}")
        self.requests_per_minute = requests_per_minute
        self.interval = 60.0 / requests_per_minute
        self._lock = threading.Lock()
        self._next = 0.0  # time.monotonic() of the next free slot

    def wait(self) -> float:
        """Block until this caller's slot; returns the seconds waited."""
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next)
            self._next = slot + self.interval
        if slot > now:
            time.sleep(slot - now)
        return slot - now


class _Budget(stop_base):
    """Stops retrying once a symbol has used its retries (shared by all of its requests)."""

    def __init__(self, retries: int) -> None:
        self.left = retries

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self.left <= 0


def _describe(outcome_exc: BaseException | None) -> str:
    if isinstance(outcome_exc, requests.HTTPError) and outcome_exc.response is not None:
        return f"HTTP {outcome_exc.response.status_code}"
    if isinstance(outcome_exc, requests.exceptions.ChunkedEncodingError):
        return "truncated response"
    return type(outcome_exc).__name__ if outcome_exc else "error"


def _session(symbol: str, policy: RetryPolicy, adapter: HTTPAdapter, limiter: RateLimiter | None = None) -> Session:
    """A session whose `send` retries 429/5xx/timeouts/connection errors with backoff (honouring
    Retry-After, capped by max_delay), at most max_attempts per request and budget_per_symbol in all;
    every attempt waits for its slot of the limiter, if any."""
    session = Session(timeout=(policy.connect_timeout, policy.read_timeout), raise_for_status=False)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    budget = _Budget(policy.budget_per_symbol)

    def before_sleep(state: RetryCallState) -> None:
        budget.left -= 1
        wait = state.next_action.sleep if state.next_action else 0.0
        log.info("%s: %s, retry %d of at most %d in %.1fs", symbol,
                 _describe(state.outcome.exception() if state.outcome else None),
                 state.attempt_number, policy.max_attempts - 1, wait)

    retrying = Retrying(
        retry=retry_any(retry_if_status(settings.RETRY_STATUS_CODES), retry_if_exception_type(_RETRY_EXCEPTIONS)),
        wait=wait_exponential_retry_after(multiplier=policy.backoff_factor, max=policy.max_delay),
        stop=stop_after_attempt(policy.max_attempts) | budget,
        before_sleep=before_sleep,
        reraise=True,
    )
    send = session.send if limiter is None else _limited(session.send, limiter)
    session.send = retrying.wraps(send)  # type: ignore[method-assign]
    return session


def _limited(send: Callable[..., requests.Response], limiter: RateLimiter) -> Callable[..., requests.Response]:
    """`send`, each call (each attempt) waiting for its slot of the limiter first."""

    def limited_send(request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        limiter.wait()
        return send(request, **kwargs)

    return limited_send


def _unreachable(exc: requests.ConnectionError) -> bool:
    """No connection could be made at all (refused, DNS, connect timeout), as opposed to a
    connection that broke mid-response."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    import urllib3.exceptions

    return isinstance(reason, urllib3.exceptions.NewConnectionError | urllib3.exceptions.ConnectTimeoutError)


def _check_response(response: requests.Response) -> None:
    """Raise on HTTP errors (the retry wrapper decides about 429/5xx) and on redirects."""
    if response.status_code >= 400:
        raise requests.HTTPError(f"HTTP {response.status_code}", response=response)
    if response.is_redirect:  # never followed: the key would go wherever the Location points
        target = urlsplit(response.headers.get("Location", ""))
        raise SymbolFetchError(f"refused HTTP {response.status_code} redirect to {target.scheme}://{target.netloc}"
                               f"{target.path} (set POLYGON_BASE_URL to the API's own origin)")


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


def _provider_message(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return (response.reason or "").strip()
    if isinstance(body, Mapping):
        return str(body.get("error") or body.get("message") or body.get("status") or "")
    return ""


ExpirationRange = tuple[date | None, date | None]  # inclusive bounds; None: open on that side


@dataclass
class ChainResult:
    """One symbol's fetch: its deduplicated Arrow pages and what happened."""

    symbol: str
    ticker_id: str
    tables: list[pa.Table] = field(default_factory=list)
    snapshot_time: datetime | None = None  # the rows' `time`
    pages: int = 0
    contracts: int = 0  # rows in `tables` (deduplicated), once fetched
    rejected: int = 0
    reject_reasons: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0  # rows another symbol of the same load already had
    error: str | None = None
    fatal: bool = False  # the provider failed for everyone (the run stops)
    attempted: bool = True
    elapsed: float = 0.0
    parse_cpu_s: float = 0.0  # CPU time of parsing its pages (in the parser's processes, if any)

    @property
    def ok(self) -> bool:
        return self.error is None


class ChainClient:
    """Fetches whole option chains from one configured origin with one key; thread-safe."""

    def __init__(self, base_url: str, api_key: str, policy: RetryPolicy | None = None,
                 extra_params: Mapping[str, str] | None = None, pool_size: int = 32,
                 limiter: RateLimiter | None = None, parser: Executor | None = None) -> None:
        self.base_url = base_url.rstrip("/") + "/"
        self.origin = "{0.scheme}://{0.netloc}".format(urlsplit(base_url))
        self.policy = policy or RetryPolicy()
        self.extra_params = dict(extra_params or {})
        self._auth = APIKeyAuth(name=settings.API_KEY_PARAM, api_key=api_key, location="query")
        self._api_key = api_key
        self._adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_size)
        self._config = RuntimeConfiguration()
        self.limiter = limiter  # shared with every other client of the same key
        # Where pages are parsed and normalised: None in the fetching thread, else this pool (of
        # processes: that work holds the GIL, which the fetch threads and the loads need).
        self.parser = parser

    def fetch(self, symbol: str, ticker_id: str, snapshot_time: datetime,
              expirations: ExpirationRange | None = None) -> ChainResult:
        """Fetch every page of the symbol's chain and normalise it.

        Args:
            symbol: the underlying.
            ticker_id: its `tickers.id`.
            snapshot_time: the snapshot identity stored in `time`.
            expirations: only this slice of the chain (inclusive bounds, None: open), sent as
                `expiration_date.gte` / `expiration_date.lte` (the cursor keeps them).

        Returns:
            A ChainResult; `error` set if the symbol failed (after retries, or bad data).

        Raises:
            ProviderError: 401/403 or the provider cannot be reached: no symbol can succeed.
        """
        started = time.monotonic()
        result = ChainResult(symbol=symbol, ticker_id=ticker_id, snapshot_time=snapshot_time)
        client = RESTClient(
            base_url=self.base_url, auth=self._auth, paginator=PinnedLinkPaginator(self.base_url),
            data_selector=_RESULTS, session=_session(symbol, self.policy, self._adapter, self.limiter),
            config=self._config,
        )
        path = settings.SNAPSHOT_PATH.format(underlying=quote(symbol, safe=""))
        params = {"limit": settings.PAGE_LIMIT, **self.extra_params}
        for name, bound in zip(("expiration_date.gte", "expiration_date.lte"), expirations or (), strict=False):
            if bound is not None:
                params[name] = bound.isoformat()
        tables: list[pa.Table] = []

        def read(response: requests.Response, *args: Any, **kwargs: Any) -> None:
            # Response hook: the body parsed once, as {"results": ParsedPage, "next_url": ...} for
            # the paginator and the data selector (dlt's RESTClient asks response.json() for both).
            _check_response(response)
            parse_args = (response.content, response.headers.get("Content-Type"), ticker_id, snapshot_time)
            if self.parser is None:
                page, next_url = parse_page(*parse_args)
            else:
                page, next_url = self.parser.submit(parse_page, *parse_args).result()
            body = {"results": page, "next_url": next_url}
            response.json = lambda **_: body  # type: ignore[method-assign]

        try:
            pages = client.paginate(path, params=params, hooks={"response": [read]}, allow_redirects=False)
            for page in pages:  # [ParsedPage]: the selector's one value, wrapped in a list
                result.pages += 1
                tables.append(page[0].table)
                result.reject_reasons.update(page[0].rejected)
                result.parse_cpu_s += page[0].cpu_s
        except requests.HTTPError as exc:
            response = exc.response
            status = response.status_code if response is not None else 0
            message = sanitize(_provider_message(response), self._api_key) if response is not None else ""
            if status in (401, 403):
                raise ProviderError(
                    f"{self.origin} answered HTTP {status} ({message or 'unauthorised'}): "
                    "check POLYGON_API_KEY and the plan's entitlements") from None
            retried = " after retries" if status in settings.RETRY_STATUS_CODES else ""
            result.error = f"HTTP {status}{retried}" + (f": {message}" if message else "")
        except requests.ConnectionError as exc:
            if _unreachable(exc):
                reason = str(getattr(exc.args[0], "reason", exc) if exc.args else exc).rsplit(": ", 1)[-1]
                raise ProviderError(f"{self.origin} is unreachable: {sanitize(reason, self._api_key)}") from None
            result.error = f"connection broken after retries: {sanitize(str(exc), self._api_key)}"
        except requests.Timeout as exc:
            result.error = f"timed out after retries: {sanitize(str(exc), self._api_key)}"
        except requests.exceptions.ChunkedEncodingError as exc:  # the body stopped short of its length
            cause = exc.args[0] if exc.args else exc
            detail = cause.args[0] if isinstance(cause, Exception) and cause.args else cause
            result.error = f"truncated response after retries: {sanitize(str(detail), self._api_key)}"
        except (requests.RequestException, ValueError) as exc:  # JSON errors are ValueErrors
            result.error = f"unreadable response: {sanitize(str(exc), self._api_key)}"
        except SymbolFetchError as exc:
            result.error = sanitize(str(exc), self._api_key)
        result.elapsed = time.monotonic() - started
        if result.ok:
            result.tables, _ = dedupe_pages(tables)
            result.rejected = sum(result.reject_reasons.values())
            result.contracts = sum(table.num_rows for table in result.tables)
        return result


def expiration_slices(counts: Sequence[tuple[date, int]], slice_contracts: int) -> list[ExpirationRange]:
    """Expiration ranges that split a chain into parallel fetches of about `slice_contracts`
    contracts each, cut at expirations so that the slices hold similar numbers of contracts.

    Args:
        counts: (expiration, contracts) of an earlier snapshot of the chain, in date order.
        slice_contracts: contracts per slice (0: never split).

    Returns:
        No ranges when the chain is small enough for one fetch; else ranges whose first and last
        are open, so that together they cover any expiration (listed since or not).
    """
    total = sum(n for _, n in counts)
    parts = -(-total // slice_contracts) if slice_contracts > 0 else 0
    if parts < 2:
        return []
    cuts: list[date] = []  # the last expiration of each slice but the last
    seen = 0  # contracts up to and including `previous`
    for (previous, before), (_, n) in zip(counts, counts[1:], strict=False):
        seen += before
        # Cut before an expiration that lies mostly beyond the next boundary (none is split).
        if len(cuts) < parts - 1 and seen + n / 2 > total * (len(cuts) + 1) / parts:
            cuts.append(previous)
    if not cuts:
        return []
    starts = [None, *(cut + timedelta(days=1) for cut in cuts)]
    return list(zip(starts, [*cuts, None], strict=True))


def merge_slices(results: Sequence[ChainResult]) -> ChainResult:
    """One symbol's result from its slices' (in slice order): the symbol fails if any slice did,
    and then nothing of it is loaded, exactly as when one request of an unsplit chain fails."""
    first = results[0]
    merged = ChainResult(first.symbol, first.ticker_id, snapshot_time=first.snapshot_time,
                         pages=sum(r.pages for r in results),
                         elapsed=max(r.elapsed for r in results))
    for r in results:
        merged.reject_reasons.update(r.reject_reasons)
        merged.parse_cpu_s += r.parse_cpu_s
    failed = [r for r in results if not r.ok]
    if failed:
        fatal = [r for r in failed if r.fatal]
        merged.error = (fatal or failed)[0].error
        merged.fatal = bool(fatal)
        merged.attempted = any(r.attempted for r in results)
        return merged
    merged.tables, _ = dedupe_pages([t for r in results for t in r.tables])
    merged.rejected = sum(merged.reject_reasons.values())
    merged.contracts = sum(table.num_rows for table in merged.tables)
    return merged


def _joined(futures: list[Future[ChainResult]]) -> Future[ChainResult]:
    """A future resolved with merge_slices of `futures` once all of them are done."""
    joined: Future[ChainResult] = Future()
    left = [len(futures)]
    lock = threading.Lock()

    def done(_: Future[ChainResult]) -> None:
        with lock:
            left[0] -= 1
            if left[0]:
                return
        try:
            joined.set_result(merge_slices([f.result() for f in futures]))
        except BaseException as exc:  # noqa: BLE001 (handed to whoever waits on the future)
            joined.set_exception(exc)

    for future in futures:
        future.add_done_callback(done)
    return joined


class ChainFetcher:
    """A pool of `concurrency` threads fetching chains in submission order. Callers may submit the
    next batch (or day) before loading the current one: its fetches start as workers free up, so
    fetching goes on while a load runs.

    On a ProviderError nothing more is started: symbols not yet started come back `fatal`, not
    attempted, with the cause.
    """

    def __init__(self, concurrency: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="polygon")
        self._stop = threading.Event()
        self.fatal: str | None = None

    def submit(self, client: ChainClient, symbols: Mapping[str, str], snapshot_time: datetime,
               slices: Mapping[str, Sequence[ExpirationRange]] | None = None) -> list[Future[ChainResult]]:
        """Queue the symbols' fetches; returns their futures in symbol order. A symbol with
        `slices` (expiration ranges covering every date, see expiration_slices) is fetched as
        that many request chains in parallel, one future for all of them (merge_slices)."""
        futures = []
        for symbol, ticker_id in symbols.items():
            parts = list((slices or {}).get(symbol) or [None])
            pending = [self._pool.submit(self._work, client, symbol, ticker_id, snapshot_time, part)
                       for part in parts]
            futures.append(pending[0] if len(pending) == 1 else _joined(pending))
        return futures

    def _work(self, client: ChainClient, symbol: str, ticker_id: str, snapshot_time: datetime,
              expirations: ExpirationRange | None = None) -> ChainResult:
        if self._stop.is_set():
            return ChainResult(symbol, ticker_id, error=f"not fetched: {self.fatal or 'the run stopped'}",
                               fatal=True, attempted=False)
        try:
            return client.fetch(symbol, ticker_id, snapshot_time, expirations)
        except ProviderError as exc:
            self.fatal = self.fatal or str(exc)
            self._stop.set()
            return ChainResult(symbol, ticker_id, error=str(exc), fatal=True)
        except Exception as exc:  # a bug or an unexpected library error: this symbol only
            log.debug("%s: unexpected error", symbol, exc_info=True)
            return ChainResult(symbol, ticker_id, error=sanitize(f"{type(exc).__name__}: {exc}", client._api_key))

    @staticmethod
    def completed(futures: Iterable[Future[ChainResult]]) -> Iterator[ChainResult]:
        """Results in order of completion."""
        for future in as_completed(list(futures)):
            yield future.result()

    def close(self) -> None:
        """Start nothing new; wait for the fetches in flight."""
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ChainFetcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def iter_results(client: ChainClient, symbols: Mapping[str, str], snapshot_time: datetime,
                 concurrency: int) -> Iterator[ChainResult]:
    """Fetch symbols in parallel threads and yield each result as it completes."""
    with ChainFetcher(concurrency) as fetcher:
        yield from fetcher.completed(fetcher.submit(client, symbols, snapshot_time))
