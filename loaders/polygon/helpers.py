"""HTTP for the source: the configured origin only, paging through `next_url`, retries and the rate limit."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, Future
from datetime import date, datetime
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import requests
import urllib3.exceptions
from dlt.sources.helpers.requests.retry import retry_if_status, wait_exponential_retry_after
from dlt.sources.helpers.rest_client.auth import BearerTokenAuth
from requests.adapters import HTTPAdapter
from tenacity import (
    RetryCallState,
    Retrying,
    retry_any,
    retry_if_exception_type,
    stop_after_attempt,
)
from tenacity.stop import stop_base

from ..logs import redact, register_secret
from . import settings
from .configuration import PolygonConfiguration
from .rows import ChainResult, ParsedPage, SymbolFetchError, parse_page, peek_next_url
from .slicing import ExpirationRange

log = logging.getLogger(__name__)

_RETRY_EXCEPTIONS = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


class ProviderError(RuntimeError):
    """The provider refuses or cannot serve anyone (401, unreachable): the whole run stops."""


def one_line(text: str) -> str:
    """Text for a log line, a summary or the ledger: one line, short, without any registered secret."""
    return " ".join(redact(text).split())[:400]


def pin_next_url(next_url: str, base_url: str, prefix: str = settings.SNAPSHOT_PATH_PREFIX) -> str:
    """The URL to follow for a `next_url`, always on the configured origin.

    A next_url on another origin (Polygon answers with api.polygon.io even when reached through
    another host) is rewritten onto the configured origin if it stays on the snapshot endpoint,
    and refused otherwise: the key is only ever sent to the configured origin. Any `apiKey` in the
    next_url is dropped (auth adds ours).

    Args:
        prefix: the path the next_url must stay under (the endpoint being paged).

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
    if not path.startswith(prefix):
        raise SymbolFetchError(f"refused next_url outside the endpoint {prefix}: {parts.netloc}{parts.path}")
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
                       if k.lower() != settings.API_KEY_PARAM.lower()])
    if parts.netloc and (parts.scheme, parts.netloc) != (base.scheme, base.netloc):
        log.debug("next_url on %s://%s rewritten onto the configured origin %s://%s",
                  parts.scheme, parts.netloc, base.scheme, base.netloc)
    return urlunsplit((base.scheme, base.netloc, base_path + path, query, ""))


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


def _unreachable(exc: requests.ConnectionError) -> bool:
    """No connection could be made at all (refused, DNS, connect timeout), as opposed to a
    connection that broke mid-response."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return isinstance(reason, urllib3.exceptions.NewConnectionError | urllib3.exceptions.ConnectTimeoutError)


def _provider_message(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return (response.reason or "").strip()
    if isinstance(body, Mapping):
        return str(body.get("error") or body.get("message") or body.get("status") or "")
    return ""


def _log_retry(symbol: str, budget: _Budget, max_attempts: int, state: RetryCallState) -> None:
    budget.left -= 1
    wait = state.next_action.sleep if state.next_action else 0.0
    log.info("%s: %s, retry %d of at most %d in %.1fs", symbol,
             _describe(state.outcome.exception() if state.outcome else None),
             state.attempt_number, max_attempts - 1, wait)


def _check_response(response: requests.Response) -> None:
    """Raise on HTTP errors (retried or not, as the retry policy says) and on redirects."""
    if response.status_code >= 400:
        raise requests.HTTPError(f"HTTP {response.status_code}", response=response)
    if response.is_redirect:  # never followed: the key would go wherever the Location points
        target = urlsplit(response.headers.get("Location", ""))
        raise SymbolFetchError(f"refused HTTP {response.status_code} redirect to {target.scheme}://{target.netloc}"
                               f"{target.path} (set POLYGON_BASE_URL to the API's own origin)")


class ChainClient:
    """Fetches whole option chains from the configured origin with the configured key; thread-safe."""

    def __init__(self, config: PolygonConfiguration, as_of: date | None = None, pool_size: int = 4,
                 limiter: RateLimiter | None = None, parser: Executor | None = None) -> None:
        """Args:
            config: origin, key and retry settings.
            as_of: the day to ask for (`date=`; the simulator serves any day). None asks for the
                current chain, the only one the live snapshot endpoint serves.
            pool_size: connections kept to the origin (one per fetch thread).
            limiter: the plan's request limit, shared with every other client of the same key.
            parser: processes that parse the pages (that work holds the GIL, which the fetch
                threads and the loads need); None parses in the fetching thread.
        """
        self.config = config
        self.base_url = config.polygon_base_url.rstrip("/") + "/"
        self.origin = "{0.scheme}://{0.netloc}".format(urlsplit(self.base_url))
        self.extra_params = {"date": as_of.isoformat()} if as_of else {}
        register_secret(config.polygon_api_key)
        # As the official clients send it: a header on every request, never in a URL (URLs end up in
        # proxy and server logs). Only ever sent to the configured origin: every URL is pinned to it.
        self._auth = BearerTokenAuth(token=config.polygon_api_key)
        self._session = requests.Session()
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_size)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._timeout = (settings.CONNECT_TIMEOUT, config.read_timeout)
        self.limiter = limiter
        self.parser = parser

    def fetch(self, symbol: str, ticker_id: str, snapshot_time: datetime,
              expirations: ExpirationRange | None = None) -> ChainResult:
        """Fetch every page of the symbol's chain (or of one expiration slice) and normalise it.

        Args:
            symbol: the underlying.
            ticker_id: its `tickers.id`.
            snapshot_time: the snapshot identity stored in `time`.
            expirations: only this slice of the chain (inclusive bounds, None: open), sent as
                `expiration_date.gte` / `expiration_date.lte` (the cursor keeps them).

        Returns:
            A ChainResult; `error` set if the symbol failed (after retries, or bad data).

        Raises:
            ProviderError: 401 (no or an unknown key) or the provider cannot be reached: no symbol
                can succeed. A 403 (not entitled) fails this symbol only.
        """
        started = time.monotonic()
        result = ChainResult(symbol=symbol, ticker_id=ticker_id, snapshot_time=snapshot_time)
        params: dict[str, Any] = {"limit": settings.PAGE_LIMIT, **self.extra_params}
        for name, bound in zip(("expiration_date.gte", "expiration_date.lte"), expirations or (), strict=False):
            if bound is not None:
                params[name] = bound.isoformat()
        # Index symbols raw (I:SPX), as the official clients write them; anything else percent-encoded.
        url = self.base_url + settings.SNAPSHOT_PATH.format(underlying=quote(symbol, safe=":"))
        try:
            self._paginate(result, url, params)
        except requests.HTTPError as exc:
            result.error = self._http_error(exc.response)
        except requests.ConnectionError as exc:
            if _unreachable(exc):
                reason = str(getattr(exc.args[0], "reason", exc) if exc.args else exc).rsplit(": ", 1)[-1]
                raise ProviderError(f"{self.origin} is unreachable: {one_line(reason)}") from None
            result.error = f"connection broken after retries: {one_line(str(exc))}"
        except requests.Timeout as exc:
            result.error = f"timed out after retries: {one_line(str(exc))}"
        except requests.exceptions.ChunkedEncodingError as exc:  # the body stopped short of its length
            cause = exc.args[0] if exc.args else exc
            detail = cause.args[0] if isinstance(cause, Exception) and cause.args else cause
            result.error = f"truncated response after retries: {one_line(str(detail))}"
        except (requests.RequestException, ValueError) as exc:
            result.error = f"unreadable response: {one_line(str(exc))}"
        except SymbolFetchError as exc:
            result.error = one_line(str(exc))
        result.elapsed = time.monotonic() - started
        if result.ok:
            result.count()
        else:
            result.tables = []
        return result

    def _paginate(self, result: ChainResult, url: str, params: dict[str, Any] | None) -> None:
        """Every page of the chain into `result`. With parser processes, the next page is asked
        for as soon as its `next_url` is read off the raw body (peek_next_url) while the parser
        reads this one: waiting for each parse before the next request made a page's round trip
        about 40% longer (measured: 851 pages at concurrency 4, 7.5 s parsed in turn, 5.3 s
        overlapped). A page's parse is settled when the next page arrives, so bad data stops the
        chain one request later at most; its next_url must be the one followed."""
        pending: list[tuple[Future[tuple[ParsedPage, Any]], str]] = []

        def add(page: ParsedPage) -> None:
            result.pages += 1
            result.tables.append(page.table)
            result.reject_reasons.update(page.rejected)
            result.parse_cpu_s += page.cpu_s

        def settle() -> None:
            future, followed = pending.pop()
            page, next_url = future.result()
            if next_url != followed:
                raise SymbolFetchError(f"unreadable response: next_url {next_url!r} in the page, "
                                       f"{followed!r} in its raw body")
            add(page)

        def read(response: requests.Response) -> Any:
            parse_args = (response.content, response.headers.get("Content-Type"), result.ticker_id,
                          result.snapshot_time)
            if self.parser is None:
                page, next_url = parse_page(*parse_args)
                add(page)
                return next_url
            future = self.parser.submit(parse_page, *parse_args)
            if pending:
                settle()
            next_url = peek_next_url(response.content)
            if next_url is None:  # not in the compact form (or the last page): the parse says
                next_url = future.result()[1]
            pending.append((future, next_url))
            return next_url

        self._follow(result.symbol, url, params, settings.SNAPSHOT_PATH_PREFIX, read)
        if pending:
            settle()

    def _follow(self, label: str, url: str, params: dict[str, Any] | None, prefix: str,
                read: Callable[[requests.Response], Any]) -> None:
        """Each page to `read`, which returns its `next_url`, followed until it is absent (later
        pages carry only their cursor), only on the configured origin under `prefix`, never in a loop."""
        budget = _Budget(self.config.retry_budget)
        followed: set[str] = set()
        while True:
            next_url = read(self._retrying(label, budget)(self._get, url, params))
            if not next_url:
                return
            url, params = pin_next_url(next_url, self.base_url, prefix), None
            if url in followed or len(followed) >= settings.MAX_PAGES:
                raise SymbolFetchError("next_url repeats itself: pagination does not end")
            followed.add(url)

    def _retrying(self, label: str, budget: _Budget) -> Retrying:
        """The retry policy of one request: 429, 5xx, timeouts and broken connections, within the
        request's attempts and the budget of its symbol (`label` names it in the log)."""
        config = self.config
        return Retrying(
            retry=retry_any(retry_if_status(settings.RETRY_STATUS_CODES), retry_if_exception_type(_RETRY_EXCEPTIONS)),
            wait=wait_exponential_retry_after(multiplier=config.backoff_factor, max=config.max_retry_delay),
            stop=stop_after_attempt(config.max_attempts) | budget,
            before_sleep=lambda state: _log_retry(label, budget, config.max_attempts, state),
            reraise=True,
        )

    def json_pages(self, label: str, path: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        """Every page of a paged JSON endpoint of the configured origin (the history endpoints),
        with this client's session, auth, retries and rate limit, paged as the chains are.

        Raises:
            requests.HTTPError: an error answer (after retries); SymbolFetchError: not JSON, or a
            next_url that leaves the endpoint or repeats itself.
        """
        prefix, bodies = "/" + path, []

        def read(response: requests.Response) -> Any:
            try:
                body = response.json()
            except ValueError:
                raise SymbolFetchError(f"unreadable response from {prefix}: not JSON") from None
            if not isinstance(body, dict):
                raise SymbolFetchError(f"unreadable response from {prefix}: not an object")
            bodies.append(body)
            return body.get("next_url")

        self._follow(label, self.base_url + path, params, prefix, read)
        return bodies

    def _get(self, url: str, params: dict[str, Any] | None) -> requests.Response:
        """One attempt: waits for its slot of the rate limit, if any."""
        if self.limiter is not None:
            self.limiter.wait()
        response = self._session.get(url, params=params, auth=self._auth, timeout=self._timeout,
                                     allow_redirects=False)
        _check_response(response)
        return response

    def _http_error(self, response: requests.Response | None) -> str:
        """The symbol's error for an HTTP error answer (after retries, if it was retried)."""
        status = response.status_code if response is not None else 0
        message = one_line(_provider_message(response)) if response is not None else ""
        if status == 401:  # no key or an unknown key: nothing can succeed
            raise ProviderError(f"{self.origin} answered HTTP 401 ({message or 'unauthorised'}): "
                                "check POLYGON_API_KEY") from None
        if status == 403:  # this underlying is not in the plan: this symbol only
            return f"HTTP 403 not entitled: {message or 'refused'}"
        retried = " after retries" if status in settings.RETRY_STATUS_CODES else ""
        return f"HTTP {status}{retried}" + (f": {message}" if message else "")
