"""The snapshot endpoint's query: filters, sort and order, and the cursor that carries them.

Polygon's `/v3/snapshot/options/{U}` takes `contract_type`, `strike_price` and
`expiration_date` (each also as `.gt/.gte/.lt/.lte`), `sort` (ticker, expiration_date,
strike_price; default ticker) and `order` (asc, desc; default asc). Pages after the first carry
only the cursor, so the cursor holds the whole query (as Polygon's base64 `ap=...&sort=ticker`).
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import date
from typing import Any
from urllib.parse import parse_qsl, urlencode

SORTS = ("ticker", "expiration_date", "strike_price")
ORDERS = ("asc", "desc")
CONTRACT_TYPES = ("call", "put")
_OPS = ("", ".gt", ".gte", ".lt", ".lte")
_TESTS = {
    "": lambda a, b: a == b, ".gt": lambda a, b: a > b, ".gte": lambda a, b: a >= b,
    ".lt": lambda a, b: a < b, ".lte": lambda a, b: a <= b,
}
DEFAULT_LIMIT = 10


@dataclass(frozen=True)
class ChainQuery:
    """One request's view of a chain: the day, the filters, the order and where the page starts."""

    as_of: date
    limit: int
    offset: int = 0
    number: int = 1  # 1 = the first page of the chain
    contract_type: str | None = None
    expiration: tuple[tuple[str, str], ...] = ()  # (operator suffix, ISO date)
    strike: tuple[tuple[str, float], ...] = ()  # (operator suffix, strike)
    sort: str = "ticker"
    order: str = "asc"

    @property
    def is_plain(self) -> bool:
        """No filter and the default order: the market's chain as it is."""
        return (self.contract_type is None and not self.expiration and not self.strike
                and self.sort == "ticker" and self.order == "asc")

    def selection(self) -> tuple[Any, ...]:
        """What decides the contracts and their order (not the page): a cache key."""
        return (self.as_of, self.contract_type, self.expiration, self.strike, self.sort, self.order)

    def next_page(self, offset: int) -> ChainQuery:
        return replace(self, offset=offset, number=self.number + 1)

    def select(self, contracts: list[tuple[dict[str, Any], bytes]]) -> list[bytes]:
        """The serialised contracts (with their parsed `details`) this query keeps, in its order."""
        kept = [(d, raw) for d, raw in contracts if self._matches(d)]
        field = self.sort
        kept.sort(key=lambda item: (item[0][field], item[0]["ticker"]), reverse=self.order == "desc")
        return [raw for _, raw in kept]

    def _matches(self, details: Mapping[str, Any]) -> bool:
        if self.contract_type is not None and details["contract_type"] != self.contract_type:
            return False
        expiry, strike = details["expiration_date"], details["strike_price"]
        return (all(_TESTS[op](expiry, value) for op, value in self.expiration)
                and all(_TESTS[op](strike, value) for op, value in self.strike))

    def cursor(self) -> str:
        """The whole query as an opaque token (base64url of a query string), deterministic."""
        raw = urlencode(self._params()).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    def _params(self) -> list[tuple[str, str]]:
        params = [("date", self.as_of.isoformat()), ("limit", str(self.limit)),
                  ("offset", str(self.offset)), ("page", str(self.number))]
        if self.contract_type:
            params.append(("contract_type", self.contract_type))
        params += [(f"expiration_date{op}", value) for op, value in self.expiration]
        params += [(f"strike_price{op}", repr(value)) for op, value in self.strike]
        return [*params, ("sort", self.sort), ("order", self.order)]


def parse_query(query: Mapping[str, str], today: date, max_limit: int) -> ChainQuery:
    """The first request's parameters (or a decoded cursor's) as a ChainQuery; ValueError with
    a message fit for a 400 on anything invalid."""
    if "cursor" in query:
        return _from_cursor(query["cursor"], max_limit)
    return _parse(query, today, max_limit)


def _parse(query: Mapping[str, str], today: date, max_limit: int) -> ChainQuery:
    try:
        limit = int(query.get("limit", DEFAULT_LIMIT))
    except ValueError:
        raise ValueError("limit must be an integer") from None
    if not 1 <= limit <= max_limit:
        raise ValueError(f"limit must be between 1 and {max_limit}")
    as_of = _date(query["date"], "date") if "date" in query else today
    contract_type = query.get("contract_type")
    if contract_type is not None and contract_type not in CONTRACT_TYPES:
        raise ValueError(f"contract_type must be one of {', '.join(CONTRACT_TYPES)}")
    sort, order = query.get("sort", "ticker"), query.get("order", "asc")
    if sort not in SORTS:
        raise ValueError(f"sort must be one of {', '.join(SORTS)}")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}")
    expiration = tuple((op, _date(query[f"expiration_date{op}"], f"expiration_date{op}").isoformat())
                       for op in _OPS if f"expiration_date{op}" in query)
    strike = tuple((op, _strike(query[f"strike_price{op}"], f"strike_price{op}"))
                   for op in _OPS if f"strike_price{op}" in query)
    return ChainQuery(as_of, limit, contract_type=contract_type, expiration=expiration,
                      strike=strike, sort=sort, order=order)


def _from_cursor(cursor: str, max_limit: int) -> ChainQuery:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        params = dict(parse_qsl(raw, keep_blank_values=True, strict_parsing=True))
        page = _parse(params, date.min, max_limit)
        page = replace(page, offset=int(params["offset"]), number=int(params["page"]))
    except (binascii.Error, UnicodeDecodeError, ValueError, KeyError) as exc:
        raise ValueError("invalid cursor") from exc
    if "date" not in params or page.offset < 0 or page.number < 1:
        raise ValueError("invalid cursor")
    return page


def _date(text: str, name: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{name} must be YYYY-MM-DD") from None


def _strike(text: str, name: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name} must be a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a number")
    return value
