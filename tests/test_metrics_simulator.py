"""Against the simulator's ground truth: the published atm_iv_30d is within 0.005 of the model's
true 30-day ATM volatility (the chain only differs from the model by its strike grid)."""

from __future__ import annotations

from datetime import date

from psycopg2.extras import execute_values

from loaders.polygon.rows import normalise_page
from loaders.simulator import Market
from loaders.trading_calendar import snapshot_time
from tests.conftest import query
from tests.metrics_support import (  # noqa: F401  (fixtures)
    add_watchlist,
    dbt_artifacts_in_tmp,
    documents,
    run_metrics,
)

SYMBOLS = ("AAPL", "TSLA", "SPY", "KO", "GME", "MSTR")
DATES = (date(2025, 3, 3), date(2025, 9, 12), date(2025, 12, 19))
COLUMNS = ("time", "ticker_id", "contract_ticker", "expiration_date", "strike_price", "option_type",
           "implied_volatility", "delta", "open_interest", "volume")
INSERT = ("insert into options_chains (time, ticker_id, contract_ticker, expiration_date, strike_price,"
          " option_type, implied_volatility, delta, open_interest, volume) values %s")


def _load(database, market: Market, symbol: str, day: date) -> None:
    (ticker_id,) = query(database, "select id::text from tickers where symbol = %s", (symbol,))[0]
    table, rejected = normalise_page(market.chain(symbol, day), ticker_id, snapshot_time(day))
    assert not rejected
    rows = zip(*(table.column(name).to_pylist() for name in COLUMNS), strict=True)
    with database.connect() as conn, conn.cursor() as cur:
        execute_values(cur, INSERT, list(rows))


def test_atm_iv_30d_matches_the_simulators_truth(database, market: Market) -> None:
    add_watchlist(database, SYMBOLS)
    for symbol in SYMBOLS:
        for day in DATES:
            _load(database, market, symbol, day)
    for day in DATES:
        assert run_metrics(database, "--date", day.isoformat(), "--quiet") == 0
    published = documents(database)
    errors = {}
    for symbol in SYMBOLS:
        for day in DATES:
            doc = published[(symbol, day)]
            truth = market.truth(symbol, day)["atm_iv_30d"]
            assert doc["status"] == "SUCCESS", (symbol, day, doc)
            errors[(symbol, day)] = abs(doc["metrics"]["atm_iv_30d"] - truth)
    worst = max(errors, key=errors.__getitem__)
    assert errors[worst] < 0.005, f"{worst}: off by {errors[worst]:.5f}"
