"""The source's settings, declared once and resolved by dlt."""

from __future__ import annotations

from typing import Optional

from dlt.common.configuration import configspec, resolve_configuration
from dlt.common.configuration.specs import BaseConfiguration
from dlt.common.typing import TSecretStrValue

from . import settings


@configspec
class PolygonConfiguration(BaseConfiguration):
    """Resolved like a source's arguments: `[sources.polygon]` in .dlt/*.toml, SOURCES__POLYGON__*
    variables or, with no section, POLYGON_API_KEY, POLYGON_BASE_URL and POLYGON_REQUESTS_PER_MINUTE."""

    polygon_api_key: Optional[TSecretStrValue] = None  # noqa: UP045 (dlt reads the hint at runtime)
    polygon_base_url: str = settings.DEFAULT_BASE_URL  # the key is only ever sent to this origin
    max_attempts: int = 5  # per request, on 429, 5xx, timeouts and connection errors
    retry_budget: int = 12  # retries per symbol, all of its requests together
    backoff_factor: float = 0.5  # first backoff in seconds, doubling per attempt (Retry-After wins)
    max_retry_delay: float = 30.0  # cap of one backoff, Retry-After included
    read_timeout: float = 60.0  # seconds to wait for a response
    # A chain known to hold more than twice this many contracts is fetched as parallel
    # expiration-range slices of about this size (its pages are otherwise one after another).
    slice_contracts: int = 2_500  # 0: never slice
    requests_per_minute: Optional[float] = None  # noqa: UP045 (the plan's limit; None: no client-side limit)
    polygon_requests_per_minute: Optional[float] = None  # noqa: UP045 (the same, named like the key)

    @property
    def request_limit(self) -> float | None:
        """The plan's requests per minute, whichever name set it (None: unlimited)."""
        return self.polygon_requests_per_minute if self.requests_per_minute is None else self.requests_per_minute

    def validate(self) -> None:
        """Raises ValueError for settings no run could use."""
        if self.max_attempts < 1 or self.retry_budget < 0:
            raise ValueError("max_attempts must be >= 1 and retry_budget >= 0")
        limit = self.request_limit
        if limit is not None and not limit > 0:
            raise ValueError(f"requests_per_minute must be > 0, not {limit:g}")


def polygon_configuration() -> PolygonConfiguration:
    """The settings, resolved by dlt from its config providers (environment, .dlt/*.toml)."""
    return resolve_configuration(PolygonConfiguration(), sections=("sources", "polygon"))
