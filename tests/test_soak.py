"""Soak (slow, `make soak`): 20 consecutive simulated trading days ingested while random faults hit
random requests, re-run until the ledger has every (symbol, day) completed; the database must then
equal a fault-free run's: same rows, same contract lifecycle, no duplicates, nothing pending."""

from __future__ import annotations

import random
import threading
from datetime import date

import pytest

from loaders import ingest
from loaders import simulator as simulator_package
from loaders.ingest.providers import SimulatedSnapshots
from loaders.simulator import Fault, SimulatorServer
from loaders.trading_calendar import trading_days
from tests import test_ingest, test_reliability
from tests.test_ingest import run, watch
from tests.test_reliability import duplicates, ledger, lifecycle, stored

_workdir, second_database = test_ingest._workdir, test_reliability.second_database  # fixtures

pytestmark = pytest.mark.slow

DAYS = trading_days(date(2025, 6, 2), date(2025, 6, 30))[:20]  # weeklies and the June monthly expire in it
SYMBOLS = ("F", "KO", "T", "PFE", "INTC", "XOM", "BRK.B", "I:VIX")
# What a faulty request gets, each about as often: (action, fault) as SimulatorServer._fault_for returns them.
FAULTS = [
    ("429", Fault(retry_after_s=0)), ("5xx", Fault(status_5xx_code=502)), ("5xx", Fault()),
    ("hit", Fault(truncate_body=True)), ("hit", Fault(non_json=True)), ("hit", Fault(html_200=True)),
    ("hit", Fault(results_not_list=True)), ("hit", Fault(next_url_loop=True)), ("hit", Fault(hang_s=1.0)),
    ("hit", Fault(latency_s=0.05)), ("hit", Fault(repeat_contract_across_pages=True)),
]


class _ChaoticServer(SimulatorServer):
    """The simulator of `--provider simulator`, with a random fault on about `rate` of all requests."""

    rng = random.Random(9)
    rate = 0.08
    hits = 0
    _chaos_lock = threading.Lock()

    def _fault_for(self, symbol: str, page: int) -> tuple[Fault, str | None]:
        with self._chaos_lock:
            if self.rng.random() >= self.rate:
                return Fault(), None
            type(self).hits += 1
            action, fault = self.rng.choice(FAULTS)
            return fault, action


def test_twenty_days_of_random_faults_converge_to_the_fault_free_database(database, db_url, second_database,
                                                                          tmp_path, monkeypatch) -> None:
    for db in (database, second_database):
        watch(db, *(("a", s) for s in SYMBOLS))
    span = ["--provider", "simulator", "--start-date", DAYS[0].isoformat(), "--end-date", DAYS[-1].isoformat()]
    monkeypatch.setenv("SOURCES__POLYGON__READ_TIMEOUT", "0.5")
    monkeypatch.setenv("SOURCES__POLYGON__MAX_ATTEMPTS", "3")

    monkeypatch.setattr(simulator_package, "SimulatorServer", _ChaoticServer)
    monkeypatch.setattr(SimulatedSnapshots, "in_process", True)
    passes = []
    choice = random.Random(3)
    while not passes or ledger(database) != {"completed": len(DAYS) * len(SYMBOLS)}:
        assert len(passes) < 12, f"no convergence after {len(passes)} passes: {passes}"
        monkeypatch.setattr(ingest.flow, "LOAD_BATCH_SYMBOLS", choice.randint(1, len(SYMBOLS)))
        code, summary = run(db_url, *span, "--concurrency", str(choice.randint(1, 6)), "--quiet")
        assert code in (0, 1)  # 1 only if every day of the pass failed
        passes.append((summary["symbols_ok"], summary["symbols_failed"], summary["symbols_skipped"]))
    assert passes[0][1] > 0 and _ChaoticServer.hits > 20, (passes, _ChaoticServer.hits)  # the faults did bite

    monkeypatch.setattr(simulator_package, "SimulatorServer", SimulatorServer)
    (tmp_path / "clean").mkdir()
    monkeypatch.chdir(tmp_path / "clean")
    code, clean = run(second_database.url(), *span)
    assert code == 0 and clean["symbols_ok"] == len(DAYS) * len(SYMBOLS)

    assert stored(database) == stored(second_database)
    assert lifecycle(database) == lifecycle(second_database)
    assert duplicates(database) == 0
