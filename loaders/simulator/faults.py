"""The simulator's test controls: deterministic fault injection (what to break, on which requests,
and the answer a broken request gets) and the record of each request received."""

from __future__ import annotations

import json
import threading
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

TOO_MANY = ("You've exceeded the maximum requests per minute, please wait or upgrade your subscription "
            "to continue. https://polygon.io/pricing")
_HTML = (b"<!DOCTYPE html><html><head><title>503 Service Temporarily Unavailable</title></head>"
         b"<body><h1>Service Temporarily Unavailable</h1><p>Please try again later.</p></body></html>")


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


class FaultBook:
    """The faults in force, per underlying or for all ("*"), and their per-symbol counters."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: dict[str, Fault] = {}
        self._counters: dict[tuple[str, str], list[int]] = {}  # (fault key, symbol): 429s, 5xx, hits

    def set(self, symbol_or_star: str, fault: Fault) -> None:
        """Put a fault in force; its counters start from zero."""
        with self._lock:
            self._faults[symbol_or_star] = fault
            for key in [k for k in self._counters if k[0] == symbol_or_star]:
                del self._counters[key]

    def clear(self) -> None:
        """Remove every fault and reset the counters."""
        with self._lock:
            self._faults.clear()
            self._counters.clear()

    def action(self, symbol: str, page: int) -> tuple[Fault, str | None]:
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


def status_reply(fault: Fault, action: str | None, rid: str) -> tuple[int, bytes, dict[str, str]] | None:
    """The 429 or 5xx answer (status, JSON body, headers) that `action` asks for, else None."""
    if action == "429":
        headers = {} if fault.retry_after_s is None else {"Retry-After": str(fault.retry_after_s)}
        return 429, _json({"status": "ERROR", "request_id": rid, "error": TOO_MANY}), headers
    if action == "5xx":
        body = _json({"status": "ERROR", "request_id": rid, "error": "Internal server error"})
        return fault.status_5xx_code, body, {}
    return None


def body_reply(fault: Fault, rid: str) -> tuple[bytes, str] | None:
    """The broken 200 body (and its content type) a hit with a body fault gets, else None."""
    if fault.non_json:
        return b"upstream connect error or disconnect/reset before headers", "application/json"
    if fault.html_200:
        return _HTML, "text/html; charset=utf-8"
    if fault.results_not_list:
        return _json({"status": "OK", "request_id": rid,
                      "results": {"message": "results temporarily unavailable"}}), "application/json"
    return None


def _json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()
