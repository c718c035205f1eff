"""The market simulator as a Polygon-compatible HTTP server, with deterministic fault injection."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass
from datetime import date
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from ..trading_calendar import today as calendar_today
from .history import History, HistoryError, not_entitled
from .market import Market

log = logging.getLogger(__name__)

_PATH_RE = re.compile(r"^/v3/snapshot/options/([^/]+)$")
_DEFAULT_LIMIT = 10
# Polygon's filters on the snapshot (inclusive bounds), kept by the cursor like the date.
_EXPIRATION_FILTERS = ("expiration_date.gte", "expiration_date.lte")
_EXPIRATION_KEY = b'"expiration_date":"'
_HTML = (b"<!DOCTYPE html><html><head><title>503 Service Temporarily Unavailable</title></head>"
         b"<body><h1>Service Temporarily Unavailable</h1><p>Please try again later.</p></body></html>")
_TOO_MANY = ("You've exceeded the maximum requests per minute, please wait or upgrade your subscription "
             "to continue. https://polygon.io/pricing")


@dataclass(frozen=True)
class Fault:
    """What to break, and when. Deterministic: counters are kept per symbol.

    A request matches when its page number (1 = the first request of a chain) is in `on_pages`
    (None: every page). Of the matching requests for a symbol, the first `status_429_times` get a
    429 (with `Retry-After: retry_after_s` unless None), the next `status_5xx_times` a
    `status_5xx_code`. Each matching request after those, at most `times` of them (None: all),
    gets every other knob that is set: `latency_s` and `hang_s` (sleeps before answering), then at
    most one body fault (the first set of non_json, html_200, results_not_list), else the page with
    the pagination faults applied to its `next_url`, cut short if `truncate_body`.
    """

    latency_s: float = 0.0
    status_429_times: int = 0
    retry_after_s: int | None = 1
    status_5xx_times: int = 0
    status_5xx_code: int = 503
    hang_s: float = 0.0  # sleep this long, then answer normally (long after a client timed out)
    truncate_body: bool = False  # full Content-Length, half the body, connection closed
    non_json: bool = False  # 200, application/json, a body that is not JSON
    html_200: bool = False  # 200 with an HTML page, as a proxy or maintenance page sends
    results_not_list: bool = False  # 200 whose "results" is an object
    repeat_contract_across_pages: bool = False  # the next page starts with this page's last one
    next_url_loop: bool = False  # next_url points back to this same page
    foreign_next_url: str | None = None  # origin (scheme://host:port) to put in next_url
    on_pages: Collection[int] | None = None
    times: int | None = None

    def __post_init__(self) -> None:
        if self.on_pages is not None:
            object.__setattr__(self, "on_pages", frozenset(self.on_pages))
        if self.status_5xx_code < 500 or self.status_5xx_code > 599:
            raise ValueError(f"status_5xx_code must be 5xx, got {self.status_5xx_code}")


@dataclass(frozen=True)
class RequestRecord:
    """One request as the server received it (also readable as record["query"])."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names as the client sent them
    time: float  # time.time() on arrival

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


@dataclass
class _Page:
    """Where a request is in a chain: decoded from the cursor, or the first page. The cursor
    keeps the date and the expiration filters of the first request, as Polygon's does."""

    as_of: date
    offset: int
    limit: int
    number: int
    expiration_gte: date | None = None
    expiration_lte: date | None = None

    def cursor(self) -> str:
        fields = [self.as_of.isoformat(), str(self.offset), str(self.limit), str(self.number)]
        if self.expiration_gte or self.expiration_lte:
            fields += [d.isoformat() if d else "" for d in (self.expiration_gte, self.expiration_lte)]
        return base64.urlsafe_b64encode(",".join(fields).encode()).decode().rstrip("=")

    @classmethod
    def from_cursor(cls, cursor: str) -> _Page:
        try:
            raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
            day, offset, limit, number, *bounds = raw.split(",")
            if len(bounds) not in (0, 2):
                raise ValueError("invalid cursor")
            gte, lte = (date.fromisoformat(b) if b else None for b in (bounds or ["", ""]))
            page = cls(date.fromisoformat(day), int(offset), int(limit), int(number), gte, lte)
        except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
            raise ValueError("invalid cursor") from exc
        if page.offset < 0 or page.limit < 1 or page.number < 1:
            raise ValueError("invalid cursor")
        return page


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a hung handler never blocks stop()
    simulator: SimulatorServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client dropping an idle keep-alive connection (a retry, a closed pool) is normal; the
        # base class would print a traceback for it on stderr.
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            log.debug("client %s went away", client_address)
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clients page through a chain on one connection
    # Headers and body go in separate writes: with Nagle's algorithm a small body (a contract's
    # daily bars) waited for the client's delayed ACK, about 40 ms a request.
    disable_nagle_algorithm = True
    server: _HTTPServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        try:
            self.server.simulator._handle(self)
        except (BrokenPipeError, ConnectionResetError):
            log.debug("client went away")
        except Exception:  # a bug here must reach the log, not socketserver's stderr dump
            log.exception("simulator failed on %s", self.path.split("?")[0])
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (signature of the base)
        log.debug("%s %s", self.address_string(), format % args)


def _send(handler: BaseHTTPRequestHandler, status: int, body: bytes,
          content_type: str = "application/json", headers: dict[str, str] | None = None,
          truncate: bool = False) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(body[: len(body) // 2] if truncate else body)
    if truncate:  # the promised length never arrives: the client sees a broken transfer
        handler.wfile.flush()
        handler.close_connection = True


def _json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _request_id(*parts: object) -> str:
    # Deterministic, so that the same request always gets byte-identical pages.
    return hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=16).hexdigest()


class SimulatorServer:
    """Serves `GET /v3/snapshot/options/{underlying}` from a Market over loopback HTTP.

    The real API's parameters `limit`, `cursor`, `apiKey` and the expiration filters
    `expiration_date.gte` / `expiration_date.lte`; besides them, the first request of a chain may
    carry `date=YYYY-MM-DD` (the real endpoint only has today). The cursor keeps the date and the
    filters.
    """

    def __init__(self, market: Market | None = None, *, api_key: str = "sim-key",
                 host: str = "127.0.0.1", port: int = 0, today: date | None = None,
                 not_entitled: Collection[str] = frozenset(), max_limit: int = 250,
                 rate_limit: tuple[int, float] | None = None, refuse: Collection[str] = ()) -> None:
        """Args:
        market: the market to serve (default Market(seed=42)).
        api_key: the only key accepted (query `apiKey` or `Authorization: Bearer`).
        host, port: where to listen; port 0 picks a free one (see base_url).
        today: the date served without `date=`; default the current date in New York.
        not_entitled: underlyings answered with 403, as for a plan without them.
        max_limit: the largest `limit` accepted (Polygon: 250).
        rate_limit: (n, seconds): a plan's request limit. A request arriving when n requests were
            already served in the last `seconds` gets a 429 (counted in `rate_limited`), as the
            real API answers a key over its plan's rate (free tier: (5, 60)).
        refuse: history endpoint families answered with 403 (history.FAMILIES), as for a plan
            without them, e.g. ("open_interest",).
        """
        self.market = market or Market()
        self.api_key = api_key
        self.host, self.port = host, port
        self.today = today
        self.not_entitled = frozenset(not_entitled)
        self.max_limit = max_limit
        self.rate_limit = rate_limit
        self.rate_limited = 0  # 429s sent because of rate_limit
        self._served: deque[float] = deque()  # arrival times (monotonic) of requests within rate_limit
        self._lock = threading.Lock()
        # Bounded: a long `kapman simulator serve` session must not grow without limit.
        self._requests: deque[RequestRecord] = deque(maxlen=100_000)
        self._faults: dict[str, Fault] = {}
        self._filtered: dict[tuple[str, date, date | None, date | None], list[bytes]] = {}
        self._counters: dict[tuple[str, str], list[int]] = {}  # (fault key, symbol): 429s, 5xx, hits
        self._stopping = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.history = History(self.market, lambda: self.today or calendar_today(), refuse)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> SimulatorServer:
        """Listen and serve in a daemon thread; returns self."""
        if self._httpd is not None:
            return self
        self._stopping.clear()
        self._httpd = _HTTPServer((self.host, self.port), _Handler)
        self._httpd.simulator = self
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"simulator:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; sleeping (latency, hang) handlers wake up and drop their connection."""
        if self._httpd is None:
            return
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join()
        self._httpd, self._thread = None, None

    def __enter__(self) -> SimulatorServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        """The origin to use as the API base, e.g. http://127.0.0.1:54321."""
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        return f"http://{host}:{self.port}"

    # -- test controls -------------------------------------------------------------------------

    @property
    def requests(self) -> list[RequestRecord]:
        """A copy of the requests received so far (the last 100,000), oldest first."""
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        """Forget the recorded requests."""
        with self._lock:
            self._requests.clear()

    def set_fault(self, symbol_or_star: str, fault: Fault) -> None:
        """Inject a fault for one underlying, or for all ("*"; a symbol's own fault wins).
        Its counters start from zero."""
        with self._lock:
            self._faults[symbol_or_star] = fault
            for key in [k for k in self._counters if k[0] == symbol_or_star]:
                del self._counters[key]

    def clear_faults(self) -> None:
        """Remove every fault and reset the counters."""
        with self._lock:
            self._faults.clear()
            self._counters.clear()

    # -- serving -------------------------------------------------------------------------------

    def _handle(self, handler: _Handler) -> None:
        split = urlsplit(handler.path)
        query = dict(parse_qsl(split.query, keep_blank_values=True))
        record = RequestRecord("GET", split.path, query, dict(handler.headers.items()), time.time())
        with self._lock:
            self._requests.append(record)
        match = _PATH_RE.match(split.path)
        history = None if match else self.history.family(split.path)
        if not match and history is None:
            _send(handler, 404, _json({"status": "NOT_FOUND", "request_id": _request_id(split.path),
                                       "message": "The requested resource was not found"}))
            return
        symbol = unquote(match[1]) if match else ""
        rid = _request_id(self.market.seed, split.path)

        auth = handler.headers.get("Authorization", "")
        key = query.get("apiKey") or (auth[7:].strip() if auth.startswith("Bearer ") else "")
        if key != self.api_key:
            error = "API Key was not provided" if not key else "Unknown API Key"
            _send(handler, 401, _json({"status": "ERROR", "request_id": rid, "error": error}))
            return
        if self._over_rate_limit():
            window = self.rate_limit[1] if self.rate_limit else 1
            _send(handler, 429, _json({"status": "ERROR", "request_id": rid, "error": _TOO_MANY}),
                  headers={"Retry-After": str(max(1, round(window)))})
            return
        if history is not None:
            self._handle_history(handler, split.path, query, rid)
            return
        if symbol in self.not_entitled:
            _send(handler, 403, _json({
                "status": "NOT_AUTHORIZED", "request_id": rid,
                "message": "You are not entitled to this data. Please upgrade your plan at "
                           "https://polygon.io/pricing"}))
            return
        try:
            page = self._page(query)
        except ValueError as exc:
            _send(handler, 400, _json({"status": "ERROR", "request_id": rid, "error": str(exc)}))
            return

        fault, action = self._fault_for(symbol, page.number)
        if action == "429":
            headers = {} if fault.retry_after_s is None else {"Retry-After": str(fault.retry_after_s)}
            _send(handler, 429, _json({"status": "ERROR", "request_id": rid, "error": _TOO_MANY}),
                  headers=headers)
            return
        if action == "5xx":
            _send(handler, fault.status_5xx_code,
                  _json({"status": "ERROR", "request_id": rid, "error": "Internal server error"}))
            return
        active = fault if action == "hit" else None
        if active and (active.latency_s or active.hang_s):
            if self._stopping.wait(active.latency_s + active.hang_s):
                handler.close_connection = True
                return
        self._send_page(handler, symbol, page, active)

    def _handle_history(self, handler: _Handler, path: str, query: dict[str, str], rid: str) -> None:
        """The history endpoints (history.py), after auth and the rate limit: refusals, then the
        underlying's plan and its 429/5xx/latency faults, as for its snapshot."""
        try:
            request = self.history.parse(path, query)
            if request.symbol in self.not_entitled:
                raise not_entitled()
        except HistoryError as exc:
            _send(handler, exc.status, _json(exc.body(rid)))
            return
        fault, action = self._fault_for(request.symbol, request.page) if request.symbol else (Fault(), None)
        if action == "429":
            headers = {} if fault.retry_after_s is None else {"Retry-After": str(fault.retry_after_s)}
            _send(handler, 429, _json({"status": "ERROR", "request_id": rid, "error": _TOO_MANY}),
                  headers=headers)
            return
        if action == "5xx":
            _send(handler, fault.status_5xx_code,
                  _json({"status": "ERROR", "request_id": rid, "error": "Internal server error"}))
            return
        if action == "hit" and self._stopping.wait(fault.latency_s + fault.hang_s):
            handler.close_connection = True
            return
        try:
            body = self.history.respond(request, f"http://{handler.headers.get('Host') or self.base_url[7:]}")
        except HistoryError as exc:
            _send(handler, exc.status, _json(exc.body(rid)))
            return
        _send(handler, 200, body, truncate=action == "hit" and fault.truncate_body)

    def _over_rate_limit(self) -> bool:
        """Whether this request exceeds rate_limit (sliding window); if not, it counts towards it."""
        if self.rate_limit is None:
            return False
        limit, window = self.rate_limit
        now = time.monotonic()
        with self._lock:
            while self._served and self._served[0] <= now - window:
                self._served.popleft()
            if len(self._served) >= limit:
                self.rate_limited += 1
                return True
            self._served.append(now)
            return False

    def _page(self, query: dict[str, str]) -> _Page:
        if "cursor" in query:
            page = _Page.from_cursor(query["cursor"])
            if page.limit > self.max_limit:
                raise ValueError("invalid cursor")
            return page
        try:
            limit = int(query.get("limit", _DEFAULT_LIMIT))
        except ValueError:
            raise ValueError("limit must be an integer") from None
        if not 1 <= limit <= self.max_limit:
            raise ValueError(f"limit must be between 1 and {self.max_limit}")
        if "date" in query:
            try:
                as_of = date.fromisoformat(query["date"])
            except ValueError:
                raise ValueError("date must be YYYY-MM-DD") from None
        else:
            as_of = self.today or calendar_today()
        bounds = []
        for name in _EXPIRATION_FILTERS:
            try:
                bounds.append(date.fromisoformat(query[name]) if name in query else None)
            except ValueError:
                raise ValueError(f"{name} must be YYYY-MM-DD") from None
        return _Page(as_of, 0, limit, 1, *bounds)

    def _fault_for(self, symbol: str, page: int) -> tuple[Fault, str | None]:
        """The fault that applies and what it does to this request: "429", "5xx", "hit" or None."""
        with self._lock:
            key = symbol if symbol in self._faults else "*"
            fault = self._faults.get(key)
            if fault is None or (fault.on_pages is not None and page not in fault.on_pages):
                return Fault(), None
            counts = self._counters.setdefault((key, symbol), [0, 0, 0])
            if counts[0] < fault.status_429_times:
                counts[0] += 1
                return fault, "429"
            if counts[1] < fault.status_5xx_times:
                counts[1] += 1
                return fault, "5xx"
            if fault.times is None or counts[2] < fault.times:
                counts[2] += 1
                return fault, "hit"
            return fault, None

    def _chain(self, symbol: str, page: _Page) -> list[bytes]:
        """The serialised chain, narrowed to the page's expiration filters (cached: every page of
        a filtered chain pages through the same list)."""
        contracts = self.market.chain_json(symbol, page.as_of)
        if page.expiration_gte is None and page.expiration_lte is None:
            return contracts
        key = (symbol, page.as_of, page.expiration_gte, page.expiration_lte)
        with self._lock:
            cached = self._filtered.get(key)
        if cached is None:
            lo = (page.expiration_gte or date.min).isoformat().encode()
            hi = (page.expiration_lte or date.max).isoformat().encode()
            cached = []
            for contract in contracts:
                at = contract.index(_EXPIRATION_KEY) + len(_EXPIRATION_KEY)
                if lo <= contract[at:at + 10] <= hi:  # ISO dates order as text
                    cached.append(contract)
            with self._lock:
                self._filtered[key] = cached
                while len(self._filtered) > 64:
                    del self._filtered[next(iter(self._filtered))]
        return cached

    def _send_page(self, handler: _Handler, symbol: str, page: _Page, fault: Fault | None) -> None:
        try:
            contracts = self._chain(symbol, page)
        except ValueError as exc:  # a date outside the simulated range
            _send(handler, 400, _json({"status": "ERROR", "request_id": _request_id(handler.path),
                                       "error": str(exc)}))
            return
        fault = fault or Fault()
        if fault.non_json:
            _send(handler, 200, b"upstream connect error or disconnect/reset before headers")
            return
        if fault.html_200:
            _send(handler, 200, _HTML, content_type="text/html; charset=utf-8")
            return
        rid = _request_id(self.market.seed, symbol, page.as_of, page.offset, page.limit, page.number,
                          page.expiration_gte, page.expiration_lte)
        if fault.results_not_list:
            _send(handler, 200, _json({"status": "OK", "request_id": rid,
                                       "results": {"message": "results temporarily unavailable"}}))
            return

        end = page.offset + page.limit
        following: _Page | None = None
        if fault.next_url_loop:
            following = page
        elif end < len(contracts):
            start = end - 1 if fault.repeat_contract_across_pages else end
            following = _Page(page.as_of, start, page.limit, page.number + 1, page.expiration_gte,
                              page.expiration_lte)
        parts = [b'{"status":"OK","request_id":"', rid.encode(), b'","results":[',
                 b",".join(contracts[page.offset:end]), b"]"]
        if following is not None:
            origin = fault.foreign_next_url or f"http://{handler.headers.get('Host') or self.base_url[7:]}"
            url = f"{origin.rstrip('/')}/v3/snapshot/options/{quote(symbol, safe=':.')}?cursor={following.cursor()}"
            parts += [b',"next_url":', json.dumps(url).encode()]
        parts.append(b"}")
        _send(handler, 200, b"".join(parts), truncate=fault.truncate_body)


def serve(port: int, host: str = "127.0.0.1", seed: int = 42, api_key: str | None = None) -> int:
    """Run the simulator in the foreground until Ctrl-C (`kapman simulator serve`). Returns 0."""
    if not logging.getLogger().handlers:  # called outside the CLI: still say where we listen
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    server = SimulatorServer(Market(seed), api_key=api_key or "sim-key", host=host, port=port)
    try:
        server.start()
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", host, port, exc)
        return 1
    log.info("market simulator serving SIMULATED option chains (seed %d), not market data", seed)
    log.info("base URL %s  API key %s  e.g. %s/v3/snapshot/options/AAPL?limit=250&apiKey=%s",
             server.base_url, server.api_key, server.base_url, server.api_key)
    log.info("add date=YYYY-MM-DD for another day; Ctrl-C to stop")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        server.stop()
    return 0
