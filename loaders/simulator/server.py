"""The market simulator as a Polygon-compatible HTTP server; its faults come from faults.py."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Collection
from datetime import date
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from ..trading_calendar import today as calendar_today
from .chain import check_plan
from .faults import TOO_MANY, Fault, FaultBook, RequestRecord, body_reply, status_reply
from .history import History, HistoryError, not_entitled
from .market import Market
from .query import ChainQuery, parse_query

try:  # orjson (installed with dlt) parses several times faster than the standard library
    from orjson import loads as _loads
except ImportError:  # pragma: no cover
    _loads = json.loads

log = logging.getLogger(__name__)

_PATH_RE = re.compile(r"^/v3/snapshot/options/([^/]+)$")


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
    # Headers and body go out in two writes: with Nagle on, a small body waits for the client's
    # delayed ACK (about 40 ms a request, which a history backfill makes thousands of).
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

    The real API's parameters: `limit`, `cursor`, `apiKey` (or `Authorization: Bearer`),
    `contract_type`, `strike_price` and `expiration_date` (each also `.gt/.gte/.lt/.lte`),
    `sort` (ticker, expiration_date, strike_price) and `order` (asc, desc). Besides them, the
    first request of a chain may carry `date=YYYY-MM-DD` (the real endpoint only has today).
    The cursor keeps the whole query: later pages carry nothing else.
    """

    def __init__(self, market: Market | None = None, *, api_key: str = "sim-key",
                 host: str = "127.0.0.1", port: int = 0, today: date | None = None,
                 not_entitled: Collection[str] = frozenset(), max_limit: int = 250,
                 rate_limit: tuple[int, float] | None = None, plan: str = "full",
                 refuse: Collection[str] = ()) -> None:
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
        plan: the response shape of a plan: "full" (quotes, trades, fmv, break-even, spot) or
            "starter" (none of those; `underlying_asset` is just its ticker).
        refuse: history endpoint families answered with 403 (history.FAMILIES), as for a plan
            without them, e.g. ("open_interest",).
        """
        self.plan = check_plan(plan)
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
        self._faults = FaultBook()
        self._filtered: dict[tuple[str, tuple[Any, ...]], list[bytes]] = {}
        # Per chain: its contracts' filter fields, beside the cached list they were read from.
        self._details: dict[tuple[str, date], tuple[list[bytes], list[tuple[dict[str, Any], bytes]]]] = {}
        self._select_lock = threading.Lock()
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
        self._faults.set(symbol_or_star, fault)

    def clear_faults(self) -> None:
        """Remove every fault and reset the counters."""
        self._faults.clear()

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
            _send(handler, 429, _json({"status": "ERROR", "request_id": rid, "error": TOO_MANY}),
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
        reply = status_reply(fault, action, rid)
        if reply is not None:
            _send(handler, reply[0], reply[1], headers=reply[2])
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
        reply = status_reply(fault, action, rid)
        if reply is not None:
            _send(handler, reply[0], reply[1], headers=reply[2])
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

    def _page(self, query: dict[str, str]) -> ChainQuery:
        return parse_query(query, self.today or calendar_today(), self.max_limit)

    def _fault_for(self, symbol: str, page: int) -> tuple[Fault, str | None]:
        """The fault that applies and what it does to this request: "429", "5xx", "hit" or None."""
        return self._faults.action(symbol, page)

    def _chain(self, symbol: str, page: ChainQuery) -> list[bytes]:
        """The serialised chain, narrowed and ordered as the query asks (cached: every page of a
        filtered chain pages through the same list)."""
        contracts = self.market.chain_json(symbol, page.as_of, self.plan)
        if page.is_plain:
            return contracts
        key = (symbol, page.selection())
        # One lock for building: the parallel slices of one chain read its details once.
        with self._select_lock:
            with self._lock:
                cached = self._filtered.get(key)
            if cached is None:
                index = self._details.get((symbol, page.as_of))
                if index is None or index[0] is not contracts:
                    index = self._details[(symbol, page.as_of)] = (
                        contracts, [(_loads(raw)["details"], raw) for raw in contracts])
                    while len(self._details) > 8:
                        del self._details[next(iter(self._details))]
                cached = page.select(index[1])
                with self._lock:
                    self._filtered[key] = cached
                    while len(self._filtered) > 64:
                        del self._filtered[next(iter(self._filtered))]
        return cached

    def _send_page(self, handler: _Handler, symbol: str, page: ChainQuery, fault: Fault | None) -> None:
        try:
            contracts = self._chain(symbol, page)
        except ValueError as exc:  # a date outside the simulated range
            _send(handler, 400, _json({"status": "ERROR", "request_id": _request_id(handler.path),
                                       "error": str(exc)}))
            return
        fault = fault or Fault()
        rid = _request_id(self.market.seed, self.plan, symbol, page.cursor())
        broken = body_reply(fault, rid)
        if broken is not None:
            _send(handler, 200, broken[0], content_type=broken[1])
            return

        end = page.offset + page.limit
        following: ChainQuery | None = None
        if fault.next_url_loop:
            following = page
        elif end < len(contracts):
            following = page.next_page(end - 1 if fault.repeat_contract_across_pages else end)
        parts = [b'{"status":"OK","request_id":"', rid.encode(), b'","results":[',
                 b",".join(contracts[page.offset:end]), b"]"]
        if following is not None:
            origin = fault.foreign_next_url or f"http://{handler.headers.get('Host') or self.base_url[7:]}"
            url = f"{origin.rstrip('/')}/v3/snapshot/options/{quote(symbol, safe=':.')}?cursor={following.cursor()}"
            parts += [b',"next_url":', json.dumps(url).encode()]
        parts.append(b"}")
        _send(handler, 200, b"".join(parts), truncate=fault.truncate_body)


def serve(port: int, host: str = "127.0.0.1", seed: int = 42, api_key: str | None = None,
          plan: str = "full") -> int:
    """Run the simulator in the foreground until Ctrl-C (`kapman simulator serve`). Returns 0."""
    if not logging.getLogger().handlers:  # called outside the CLI: still say where we listen
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    server = SimulatorServer(Market(seed), api_key=api_key or "sim-key", host=host, port=port,
                             plan=plan)
    try:
        server.start()
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", host, port, exc)
        return 1
    log.info("market simulator serving SIMULATED option chains (seed %d, %s plan), not market data",
             seed, server.plan)
    # The simulator's own key, not a secret: clients need it to talk to this server.
    log.info("base URL %s", server.base_url)
    log.info("API key %s", server.api_key)
    log.info("e.g. curl -H 'Authorization: Bearer %s' '%s/v3/snapshot/options/AAPL?limit=250'",
             server.api_key, server.base_url)
    log.info("add date=YYYY-MM-DD for another day; Ctrl-C to stop")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        server.stop()
    return 0
