"""The metric numbers: hand-computed chains, history ranks, snapshot choice, and the SQL models
cross-checked against an independent Python reading of the spec on random chains.

One database for the module: the chains below go in once and one `kapman metrics` run over 22
trading dates computes them all (real PostgreSQL, real dbt)."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from psycopg2 import sql

from loaders import db as dbmod
from loaders import metrics
from loaders.trading_calendar import snapshot_time, trading_days
from tests.conftest import fresh_database, query
from tests.metrics_reference import Contract, Reference
from tests.metrics_support import (  # noqa: F401  (fixtures)
    add_watchlist,
    assert_documents_match,
    dbt_artifacts_in_tmp,
    documents,
    insert_chain,
    run_metrics,
)

D = date(2025, 12, 19)  # a Friday
DATES = trading_days(date(2025, 11, 19), D)  # 22 trading dates
RANDOM_TICKERS = ("RNDA", "RNDB", "RNDC", "RNDD")


def _days(n: int) -> date:
    return D + timedelta(days=n)


def test_trading_days_seed_matches_the_calendar() -> None:
    assert metrics.TRADING_DAYS_SEED.read_text() == metrics.trading_days_seed_text()


# --- the chains ---------------------------------------------------------------------------------

HAND = [
    # 10 days: calls 0.6/0.4/0.2, puts -0.6/-0.4/-0.2, a put without IV (counts, no IV)
    Contract("C", _days(10), 0.20, 0.6, 100, 10),
    Contract("C", _days(10), 0.24, 0.4, 100, 30),
    Contract("C", _days(10), 0.30, 0.2, 100, 10),
    Contract("P", _days(10), 0.26, -0.4, 200, 20),
    Contract("P", _days(10), 0.22, -0.6, 100, 10),
    Contract("P", _days(10), 0.32, -0.2, 100, 40),
    Contract("P", _days(10), None, -0.3, 100, 0),
    # 50 days: every target delta on the grid, and a call without delta (no smile point)
    Contract("C", _days(50), 0.25, 0.5, 100, 0),
    Contract("C", _days(50), 0.28, 0.25, 100, 0),
    Contract("P", _days(50), 0.27, -0.5, 100, 0),
    Contract("P", _days(50), 0.33, -0.25, 100, None),
    Contract("C", _days(50), 0.50, None, 0, 0),
    # expiring today (DTE 0): ratios and counts only
    Contract("C", _days(0), 0.90, 0.5, 1000, 500),
    # expired (DTE < 0): ignored entirely
    Contract("P", _days(-1), 0.40, -0.5, 999, 999),
]


def _one_call(iv: float, dte: int = 30, day: date = D, oi: int | None = 1) -> list[Contract]:
    return [Contract("C", day + timedelta(days=dte), iv, 0.5, oi, 1)]


HIST_IVS = [0.10 + 0.01 * i for i in range(21)] + [0.25]  # 22 dates: 0.10 .. 0.30, then 0.25

_SESSION_BAR = datetime(2025, 12, 19, 21, 0, tzinfo=UTC)  # 16:00 in New York on D
STALE_BARS = [
    Contract("C", _days(30), 0.2, 0.5, 100, 10, _SESSION_BAR),
    # yesterday's bar, repeated by the snapshot for a contract that did not trade today
    Contract("C", _days(30), 0.2, 0.4, 100, 30, _SESSION_BAR - timedelta(days=1)),
    Contract("P", _days(30), 0.2, -0.5, 100, 20, _SESSION_BAR + timedelta(hours=3, minutes=30)),  # D in New York
    Contract("P", _days(30), 0.2, -0.4, 100, 40, datetime(2025, 12, 19, 3, 0, tzinfo=UTC)),  # D-1 in New York
    Contract("P", _days(30), 0.2, -0.3, 100, 5, None),  # bar time unknown: the volume counts
]


def _reconstructed_chain(iv: float, day: date) -> list[Contract]:
    """A reconstructed day on a plan without the open-interest endpoint: OI null everywhere."""
    bar = datetime.combine(day, datetime.min.time(), tzinfo=UTC) + timedelta(hours=21)
    return [Contract("C", day + timedelta(days=30), iv, 0.5, None, 6, bar),
            Contract("P", day + timedelta(days=30), iv + 0.02, -0.5, None, 3, bar)]


def _bar_times(day: date) -> list[datetime | None]:
    """Day-bar times around trading date `day`: unknown, in its New York session (one after the
    UTC midnight), from the session before, and 03:00 UTC on `day` (the evening before in New York)."""
    midnight = datetime.combine(day, datetime.min.time(), tzinfo=UTC)
    return [None, midnight + timedelta(hours=21), midnight + timedelta(hours=24, minutes=30),
            midnight - timedelta(hours=3), midnight + timedelta(hours=3)]


def _random_chain(rng: random.Random, day: date) -> list[Contract]:
    contracts = []
    for dte in sorted(rng.sample([0, 1, 2, 7, 14, 21, 30, 45, 60, 90, 120, 180, 365], rng.randint(1, 7))):
        for option_type in "CP":
            sign = 1 if option_type == "C" else -1
            for _ in range(rng.randint(0, 8)):
                delta = rng.choice([0.25, 0.5, 0.1, 0.75, round(rng.uniform(0.02, 0.98), 2),
                                    rng.uniform(0.01, 0.99), None, 1.0])
                iv = rng.choice([round(rng.uniform(0.1, 0.9), 3), rng.uniform(0.05, 1.5), None, 0.0, 6.0])
                contracts.append(Contract(
                    option_type, day + timedelta(days=dte), iv,
                    None if delta is None else sign * delta,
                    rng.choice([None, 0, -3, rng.randint(0, 5000)]), rng.choice([None, 0, -1, rng.randint(0, 900)]),
                    rng.choice(_bar_times(day)),
                ))
    return contracts


@pytest.fixture(scope="module")
def module_database(pg_server: dbmod.Database, template_db: str) -> Iterator[dbmod.Database]:
    """One migrated database for the module: one dbt parse, one build for every chain."""
    with fresh_database(pg_server, template_db, prefix="kapman_metrics_sql") as db:
        yield db


@pytest.fixture(scope="module")
def reference() -> Reference:
    return Reference()


@pytest.fixture(scope="module")
def published(module_database, reference: Reference) -> dict[tuple[str, date], dict[str, Any]]:
    """Every chain below in one database, then `kapman metrics` over the 22 dates."""
    db = module_database
    insert_chain(db, "HAND", D, HAND)
    add_watchlist(db, ["MISSING"])
    insert_chain(db, "STALE", date(2025, 12, 17), _one_call(0.30, 32, date(2025, 12, 17)))
    insert_chain(db, "PARTIAL", D, [Contract("C", D, 0.3, 0.5, 10, 1), Contract("P", _days(30), 7.0, -0.5, 10, 3)])
    insert_chain(db, "ZEROOI", D, [Contract("C", _days(20), 0.2, 0.5, 0, 4), Contract("P", _days(20), 0.4, -0.5, None, 6)])
    # Two snapshots on D and one after its snapshot identity: the latest at or before S wins.
    insert_chain(db, "TWICE", datetime(2025, 12, 19, 15, 0, tzinfo=UTC), _one_call(0.50))
    insert_chain(db, "TWICE", datetime(2025, 12, 19, 20, 0, tzinfo=UTC), _one_call(0.40))
    insert_chain(db, "TWICE", datetime(2025, 12, 20, 0, 0, tzinfo=UTC), _one_call(0.60))
    insert_chain(db, "STALEBAR", D, STALE_BARS)
    for i, (day, iv) in enumerate(zip(DATES, HIST_IVS, strict=True)):
        insert_chain(db, "HIST", day, _one_call(iv, day=day))
        # RECON: the first two dates reconstructed; NOIV: the first one, without any IV.
        chain, source = (_reconstructed_chain(iv, day), "reconstructed") if i < 2 else (_one_call(iv, day=day), "snapshot")
        insert_chain(db, "RECON", day, chain, source)
        reference.add("RECON", snapshot_time(day), chain, source)
        if i == 0:
            insert_chain(db, "NOIV", day, [Contract("C", day + timedelta(days=30), None, None, None, 3)], "reconstructed")
        else:
            insert_chain(db, "NOIV", day, _one_call(iv, day=day))
    rng = random.Random(20251219)
    for ticker in RANDOM_TICKERS:
        for day in DATES:
            roll = rng.random()
            if roll < 0.15:
                continue  # no snapshot: the previous one is used (stale)
            if roll < 0.25:  # an earlier snapshot the same day that must lose
                early = datetime.combine(day, datetime.min.time(), tzinfo=UTC) + timedelta(hours=14)
                chain = _random_chain(rng, day)
                insert_chain(db, ticker, early, chain)
                reference.add(ticker, early, chain)
            chain = _random_chain(rng, day)
            at = datetime.combine(day, datetime.max.time(), tzinfo=UTC)
            # Reconstructed days for two tickers only, so the other two never rank against one.
            sources = [None, "snapshot"] + (["reconstructed"] if ticker in RANDOM_TICKERS[:2] else [])
            source = rng.choice(sources)
            insert_chain(db, ticker, at, chain, source)
            reference.add(ticker, at, chain, source or "snapshot")
    assert run_metrics(db, "--start-date", DATES[0].isoformat(), "--end-date", D.isoformat()) == 0
    return documents(db)


# --- hand-computed ------------------------------------------------------------------------------

def test_hand_computed_chain(published) -> None:
    doc = published[("HAND", D)]
    m = doc["metrics"]
    assert doc["status"] == "SUCCESS"
    assert doc["as_of"] == "2025-12-19" and doc["options_snapshot_time"] == "2025-12-19T23:59:59.999999+00:00"
    # DTE >= 0: 13 contracts (the expired put is ignored), 12 with a valid IV, 3 expiries.
    assert doc["counts"] == {"contracts": 13, "contracts_with_iv": 12, "calls": 7, "puts": 6, "expiries": 3}
    # put OI 200+100+100+100 (10d) + 100+100 (50d) = 700; call OI 300 + 200 + 0 + 1000 = 1500
    assert m["put_call_ratio_oi"] == round(700 / 1500, 6)
    # put volume 20+10+40+0 + 0 = 70; call volume 10+30+10 + 0 + 0 + 500 = 550
    assert m["put_call_ratio_volume"] == round(70 / 550, 6)
    assert m["oi_ratio"] == round(620 / 2200, 6)
    # OI-weighted over IV-valid, DTE >= 1: (20+24+30+52+22+32 + 25+28+27+33 + 0) / 1100
    assert m["average_iv"] == round(293 / 1100, 6)
    # 10d smile: c50 = 0.24 + (0.20-0.24)*0.1/0.2 = 0.22, p50 = 0.22 + 0.04*0.1/0.2 = 0.24,
    # c25 = 0.30 + (0.24-0.30)*0.05/0.2 = 0.285, p25 = 0.26 + (0.32-0.26)*0.15/0.2 = 0.305;
    # 50d smile on the grid: atm (0.25+0.27)/2 = 0.26, c25 0.28, p25 0.33.
    def at_30(v10: float, v50: float) -> float:
        w10, w50 = v10**2 * 10 / 365, v50**2 * 50 / 365
        return math.sqrt((w10 + (w50 - w10) * (30 - 10) / (50 - 10)) / (30 / 365))

    atm30 = at_30(0.23, 0.26)
    assert m["atm_iv_30d"] == pytest.approx(atm30, abs=1e-6) and abs(atm30 - 0.255245) < 1e-6
    assert m["atm_iv_90d"] == 0.26  # only expiries below 90 days: the nearest, flat
    assert m["iv_term_structure"] == pytest.approx(0.26 - atm30, abs=1e-6)
    assert m["iv_skew"] == pytest.approx(at_30(0.305, 0.33) - at_30(0.285, 0.28), abs=1e-6)
    assert m["iv_rank"] is None and m["iv_percentile"] is None and m["iv_rank_30d"] is None
    assert doc["diagnostics"] == ["extrapolated_atm_iv_90d", "insufficient_atm_iv_30d_history",
                                  "insufficient_iv_history"]


def test_statuses_and_their_diagnostics(published) -> None:
    missing = published[("MISSING", D)]
    assert missing["status"] == "MISSING_OPTIONS" and missing["options_snapshot_time"] is None
    assert set(missing["metrics"].values()) == {None} and missing["diagnostics"] == ["missing_options_data"]
    assert missing["counts"] == {"contracts": 0, "contracts_with_iv": 0, "calls": 0, "puts": 0, "expiries": 0}

    stale = published[("STALE", D)]  # the 2025-12-17 snapshot; DTE counted from D: 30
    assert stale["status"] == "SUCCESS" and stale["options_snapshot_time"] == "2025-12-17T23:59:59.999999+00:00"
    assert stale["metrics"]["atm_iv_30d"] == 0.3 and "extrapolated_atm_iv_30d" not in stale["diagnostics"]
    assert "stale_options_snapshot" in stale["diagnostics"]
    assert "stale_options_snapshot" not in published[("STALE", date(2025, 12, 17))]["diagnostics"]

    partial = published[("PARTIAL", D)]  # DTE 0 and IV > 5 only: no average_iv
    assert partial["status"] == "PARTIAL" and partial["diagnostics"] == ["missing_average_iv"]
    assert partial["metrics"]["put_call_ratio_oi"] == 1 and partial["metrics"]["oi_ratio"] == 0.2
    assert partial["counts"]["contracts_with_iv"] == 1

    zero = published[("ZEROOI", D)]  # OI sum zero: plain mean, OI ratios null
    assert zero["metrics"]["average_iv"] == 0.3
    assert zero["metrics"]["put_call_ratio_oi"] is None and zero["metrics"]["oi_ratio"] is None
    assert zero["metrics"]["put_call_ratio_volume"] == 1.5


def test_volume_ratios_ignore_stale_day_bars(published) -> None:
    doc = published[("STALEBAR", D)]
    # put volume 20 + 5 (the D-1 New York bar's 40 is stale), call volume 10 (30 is stale);
    # counted, the stale bars would give 65 / 40 and 105 / 500.
    assert doc["metrics"]["put_call_ratio_volume"] == 2.5
    assert doc["metrics"]["oi_ratio"] == round(35 / 500, 6)
    assert doc["metrics"]["put_call_ratio_oi"] == 1.5
    assert doc["counts"]["contracts"] == 5


def test_reconstructed_chains_and_the_history_that_holds_them(published, reference: Reference) -> None:
    first, second, third = (published[("RECON", day)] for day in DATES[:3])
    # Reconstructed without open interest: the plain mean of the IVs, OI ratios null.
    assert first["status"] == "SUCCESS" and first["counts"]["contracts"] == 2
    assert first["metrics"]["average_iv"] == 0.11 and first["metrics"]["put_call_ratio_volume"] == 0.5
    assert first["metrics"]["put_call_ratio_oi"] is None and first["metrics"]["oi_ratio"] is None
    assert "reconstructed_chain" in first["diagnostics"]
    assert "history_includes_reconstructed" not in first["diagnostics"]  # no history yet
    assert {"reconstructed_chain", "history_includes_reconstructed"} <= set(second["diagnostics"])
    assert "reconstructed_chain" not in third["diagnostics"]
    last = published[("RECON", D)]
    assert last["metrics"]["iv_rank"] is not None
    assert last["diagnostics"] == ["extrapolated_atm_iv_90d", "history_includes_reconstructed"]
    for day, expected in reference.documents("RECON", DATES[0], D).items():
        assert_documents_match(published[("RECON", day)], expected, f"RECON {day}")
    # A reconstructed date without an average_iv or atm_iv_30d is in no history.
    no_iv = published[("NOIV", DATES[0])]
    assert no_iv["status"] == "PARTIAL"
    assert no_iv["diagnostics"] == ["missing_average_iv", "reconstructed_chain"]
    assert published[("NOIV", D)]["metrics"]["iv_rank"] is not None
    assert all("history_includes_reconstructed" not in published[("NOIV", day)]["diagnostics"]
               for day in DATES)


def test_latest_snapshot_at_or_before_the_date(published) -> None:
    doc = published[("TWICE", D)]
    assert doc["options_snapshot_time"] == "2025-12-19T20:00:00+00:00"
    assert doc["metrics"]["average_iv"] == 0.4 and "stale_options_snapshot" not in doc["diagnostics"]


def test_history_rank_and_percentile(published) -> None:
    # 21 earlier values 0.10 .. 0.30, today 0.25: rank (0.25-0.10)/(0.30-0.10) = 75,
    # percentile 15 of 21 below = 71.428571; the same for the 30-day ATM series.
    doc = published[("HIST", D)]
    expected = {"iv_rank": 75.0, "iv_percentile": round(100 * 15 / 21, 6),
                "iv_rank_30d": 75.0, "iv_percentile_30d": round(100 * 15 / 21, 6)}
    assert {k: doc["metrics"][k] for k in expected} == pytest.approx(expected, abs=1e-6)
    assert doc["diagnostics"] == ["extrapolated_atm_iv_90d"]
    # 19 earlier values: not enough history yet.
    early = published[("HIST", DATES[19])]
    assert early["metrics"]["iv_rank"] is None and early["metrics"]["iv_percentile"] is None
    assert "insufficient_iv_history" in early["diagnostics"]
    assert published[("HIST", DATES[20])]["metrics"]["iv_rank"] == 100.0


def test_every_watchlist_ticker_has_a_row_per_date(published, module_database) -> None:
    symbols = {s for (s,) in query(module_database, "select symbol from watchlists where active")}
    assert {(s, d) for s in symbols for d in DATES} <= set(published)
    assert len(published) == len(symbols) * len(DATES)


def test_random_chains_match_the_reference(published, reference: Reference) -> None:
    checked = 0
    for ticker in RANDOM_TICKERS:
        for day, expected in reference.documents(ticker, DATES[0], D).items():
            assert_documents_match(published[(ticker, day)], expected, f"{ticker} {day}")
            checked += 1
    assert checked == len(RANDOM_TICKERS) * len(DATES)
    statuses = {published[(t, d)]["status"] for t in RANDOM_TICKERS for d in DATES}
    assert "SUCCESS" in statuses


def test_dbt_unit_tests_pass(published, module_database) -> None:
    result = metrics.run_dbt(module_database, ["test", "--select", "test_type:unit"])
    assert len(result.result.results) >= 9
    assert {str(r.status) for r in result.result.results} == {"pass"}


def test_history_is_computed_when_only_the_last_date_is_requested(database) -> None:
    """A first run for one date ranks against the earlier trading dates' chains (the mart backfills
    the history it lacks), so the numbers do not depend on which dates were run before."""
    reference = Reference()
    rng = random.Random(7)
    for day in DATES:
        chain = _random_chain(rng, day) + _one_call(rng.uniform(0.1, 0.5), day=day, oi=100)
        insert_chain(database, "BACK", day, chain)
        reference.add("BACK", datetime.combine(day, datetime.max.time(), tzinfo=UTC), chain)
    assert run_metrics(database, "--date", D.isoformat()) == 0
    published = documents(database)
    assert set(published) == {("BACK", D)}
    expected = reference.documents("BACK", D, D)[D]
    assert expected["metrics"]["iv_rank"] is not None
    assert_documents_match(published[("BACK", D)], expected, "BACK")


def test_source_column_defaults_to_snapshot_and_is_checked(database) -> None:
    """0004: a plain INSERT (no source) reads 'snapshot'; other values are refused, in today's
    partitions and in a month created afterwards; dlt's staging copy has the same default."""
    insert_chain(database, "PLAIN", D, _one_call(0.3))
    assert query(database, "select distinct source from options_chains") == [("snapshot",)]
    later = date(2031, 5, 20)
    with database.connect() as conn:
        dbmod.ensure_partitions(conn, [later])
    insert_chain(database, "PLAIN", later, _one_call(0.3, day=later), "reconstructed")
    assert query(database, "select tableoid::regclass::text, source from options_chains where time >= '2031-01-01'") == [
        ("options_chains_2031_05", "reconstructed")]
    for day in (D, later):
        with pytest.raises(Exception, match="options_chains_source_check"):
            insert_chain(database, "PLAIN", day - timedelta(days=1), _one_call(0.3), "guessed")
    assert query(database, "select count(*) from options_chains")[0][0] == 2
    assert query(database, "select column_default, is_nullable from information_schema.columns"
                           " where table_schema = 'public_staging' and table_name = 'options_chains'"
                           " and column_name = 'source'") == [("'snapshot'::text", "NO")]
    indexed = query(database, "select tablename from pg_indexes where indexdef like '%%reconstructed%%'"
                              " and tablename = 'options_chains_2031_05'")
    assert indexed == [("options_chains_2031_05",)]


def test_a_mart_built_before_the_reconstructed_flag_gets_it(database) -> None:
    """The mart's pre-hook adds is_reconstructed to a mart from before the column: the history
    read from the mart needs it, and on_schema_change would add it only after that read."""
    insert_chain(database, "OLD", DATES[-2], _one_call(0.3, day=DATES[-2]))
    insert_chain(database, "OLD", D, _one_call(0.3), "reconstructed")
    assert run_metrics(database, "--date", DATES[-2].isoformat()) == 0
    (schema,) = query(database, "select table_schema from information_schema.columns"
                                " where table_name = 'volatility_metrics' and column_name = 'is_reconstructed'")[0]
    mart = sql.Identifier(schema, "volatility_metrics")
    with database.connect() as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("alter table {} drop column is_reconstructed").format(mart))
    assert run_metrics(database, "--date", D.isoformat()) == 0
    flags = sql.SQL("select as_of_date, is_reconstructed from {} order by 1").format(mart)
    assert query(database, flags) == [(DATES[-2], None), (D, True)]
    assert "reconstructed_chain" in documents(database, D)[("OLD", D)]["diagnostics"]
