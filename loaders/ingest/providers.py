"""Where chains come from: the seam between a run and its provider, and the providers.

A provider says which days it serves and gives, for each, a ChainSource (anything with
`fetch(symbol, ticker_id, snapshot_time, expirations=None) -> ChainResult`). A new provider is one
subclass of Provider; a run asks it day by day, so one provider may serve the current day from
the live snapshot and past days from elsewhere. `ChainResult.source` names how the rows were
obtained (`snapshot` by default; options_chains.source once the column exists).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Executor
from datetime import date
from typing import Any

from ..polygon import (
    ChainClient,
    ChainSource,
    PolygonConfiguration,
    RateLimiter,
    polygon_configuration,
)
from .history import Backfill, ReconstructedChains
from .outcomes import IngestError

log = logging.getLogger("kapman.ingest")


class Provider(ABC):
    """Where a run's chains come from. One per run, shared by its fetch threads.

    Args:
        config: origin, key, retry, slicing and rate-limit settings (dlt-resolved).
        current: the current trading date (the only one a live snapshot can serve).
        concurrency: fetch threads (connections to keep).
        parser: processes that parse pages (None: the fetch threads do).
    """

    name = ""

    def __init__(self, config: PolygonConfiguration, current: date, concurrency: int,
                 parser: Executor | None = None) -> None:
        self.config, self.current, self.concurrency, self.parser = config, current, concurrency, parser
        limit = config.request_limit
        # One limiter for the whole run (every worker, every day): the plan counts every request.
        self.limiter = RateLimiter(limit) if limit is not None else None
        if self.limiter is not None:
            log.info("client-side rate limit: %g requests/minute, shared by all workers", limit)
        self._sources: dict[date, ChainSource] = {}

    @classmethod
    @abstractmethod
    def refusal(cls, day: date, current: date) -> str | None:
        """Why this provider cannot give day's chains (None: it can). A class method, so that a
        dry run can ask without starting the provider."""

    @classmethod
    def reconstructs(cls, day: date, current: date) -> bool:
        """Whether day's chains are rebuilt from history rather than taken from a snapshot (a
        reconstruction never replaces rows a snapshot stored: the run skips those)."""
        return False

    def plan(self, todo: Mapping[date, Sequence[str]]) -> None:  # noqa: B027 (most providers need no plan)
        """The run's (day -> symbols) to fetch, before the first fetch: a provider that fetches
        a whole range at once (history) needs it up front."""

    def slices(self, day: date) -> bool:
        """Whether day's large chains may be fetched as expiration-range slices."""
        return True

    @abstractmethod
    def source_for(self, day: date) -> ChainSource:
        """What fetches day's chains (asked once per day, for a day not refused)."""

    def chains(self, day: date) -> ChainSource:
        """The ChainSource of `day`, made once."""
        if day not in self._sources:
            self._sources[day] = self.source_for(day)
        return self._sources[day]

    @property
    def slice_contracts(self) -> int:
        """Chains of more than twice this many contracts are fetched as slices (0: never)."""
        return self.config.slice_contracts

    def close(self) -> None:  # noqa: B027 (most providers hold nothing to release)
        """Release what the provider holds (a server, connections)."""


class PolygonSnapshots(Provider):
    """The live snapshot endpoint alone: the current chain only, so only the current trading date
    (PolygonProvider adds past days by reconstruction)."""

    name = "polygon"

    @classmethod
    def refusal(cls, day: date, current: date) -> str | None:
        if day == current:
            return None
        return (f"the live Polygon snapshot only serves the current chain (trading date {current}), "
                f"not {day}: nothing stored for {day}")

    def source_for(self, day: date) -> ChainSource:
        return ChainClient(self.config, None, self.concurrency, self.limiter, self.parser)


class SimulatedSnapshots(Provider):
    """The built-in market simulator, started in a child process (see simulator/process.py) on a
    free loopback port with a one-off key and reached over HTTP like the real API; it serves any
    day (sent as `date=`)."""

    name = "simulator"
    # A child process serves (see simulator/process.py); True: this process's threads, for tests
    # that count the server's requests or give it faults.
    in_process = False

    def __init__(self, config: PolygonConfiguration, current: date, concurrency: int,
                 parser: Executor | None = None) -> None:
        from .. import simulator
        from ..simulator.process import SimulatorProcess

        super().__init__(config, current, concurrency, parser)
        seed = int(os.environ.get("KAPMAN_SIMULATOR_SEED", "42"))
        config.polygon_api_key = secrets.token_urlsafe(18)  # registered as a secret by ChainClient
        self._server: Any = (
            simulator.SimulatorServer(simulator.Market(seed), api_key=config.polygon_api_key).start()
            if self.in_process else SimulatorProcess(seed, api_key=config.polygon_api_key))
        config.polygon_base_url = self._server.base_url
        log.info("simulator (seed %d) serving SIMULATED chains on %s", seed, self._server.base_url)

    @classmethod
    def refusal(cls, day: date, current: date) -> str | None:
        return None

    def source_for(self, day: date) -> ChainSource:
        return ChainClient(self.config, day, self.concurrency, self.limiter, self.parser)

    def close(self) -> None:
        self._server.__exit__(None, None, None)


class PolygonProvider(PolygonSnapshots):
    """`--provider polygon`: the current trading date from the live snapshot, past days
    reconstructed from the historical endpoints (ingest/history.py), later days refused."""

    def __init__(self, config: PolygonConfiguration, current: date, concurrency: int,
                 parser: Executor | None = None) -> None:
        super().__init__(config, current, concurrency, parser)
        self.backfill = Backfill(config, concurrency, self.limiter)

    @classmethod
    def refusal(cls, day: date, current: date) -> str | None:
        if day > current:
            return (f"{day} is after the current trading date {current}: there is no chain of it yet, "
                    f"nothing stored for {day}")
        return None

    @classmethod
    def reconstructs(cls, day: date, current: date) -> bool:
        return day < current

    def plan(self, todo: Mapping[date, Sequence[str]]) -> None:
        self.backfill.plan({day: symbols for day, symbols in todo.items() if self.reconstructs(day, self.current)})

    def slices(self, day: date) -> bool:
        return not self.reconstructs(day, self.current)

    def source_for(self, day: date) -> ChainSource:
        if self.reconstructs(day, self.current):
            return ReconstructedChains(self.backfill, day)
        return super().source_for(day)

    def close(self) -> None:
        self.backfill.close()


PROVIDERS: dict[str, type[Provider]] = {p.name: p for p in (PolygonProvider, SimulatedSnapshots)}


@contextlib.contextmanager
def open_provider(name: str, current: date, concurrency: int, parser: Executor | None = None) -> Iterator[Provider]:
    """The named provider with its settings resolved by dlt (POLYGON_API_KEY, POLYGON_BASE_URL,
    [sources.polygon]); the key is checked here, once."""
    config = polygon_configuration()
    try:
        config.validate()
    except ValueError as exc:
        raise IngestError(f"invalid settings: {exc}") from None
    if name == PolygonProvider.name:
        if not config.polygon_api_key:
            raise IngestError("POLYGON_API_KEY is not set: the polygon provider refuses to start without it "
                              "(or use --provider simulator)")
    provider = PROVIDERS[name](config, current, concurrency, parser)
    try:
        yield provider
    finally:
        provider.close()
