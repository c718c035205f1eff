"""loaders.reconstruction: IV and greeks of a past day from end-of-day prices, on synthetic Black-76
chains and against the market simulator's own IV and greeks."""

from __future__ import annotations

import importlib.util
import math
from datetime import UTC, date, datetime, timedelta
from datetime import time as clock
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from py_lets_be_rational import black

from loaders import reconstruction as rec
from loaders.simulator.market import RATE, Market
from loaders.trading_calendar import NEW_YORK, trading_days
from tests.conftest import FROZEN_TODAY

D = FROZEN_TODAY
R = math.log1p(0.04)
CURVE = {"date": D.isoformat(), "yield_1_month": 4.0, "yield_30_year": 4.0}
START_MS = int(datetime.combine(D, clock(0), tzinfo=NEW_YORK).timestamp()) * 1000
EXPIRY = D + timedelta(days=45)
T = 45 / 365


def _ticker(expiry: date, strike: float, call: bool) -> str:
    return f"O:TST{expiry:%y%m%d}{'C' if call else 'P'}{round(strike * 1000):08d}"


def _contract(strike: float, call: bool, expiry: date = EXPIRY, **extra: Any) -> dict[str, Any]:
    return {"ticker": _ticker(expiry, strike, call), "underlying_ticker": "TST",
            "contract_type": "call" if call else "put", "exercise_style": "american",
            "expiration_date": expiry.isoformat(), "strike_price": strike,
            "shares_per_contract": 100} | extra


def _bar(close: float, volume: int = 10) -> dict[str, Any]:
    return {"o": close, "h": close, "l": close, "c": close, "v": volume, "vw": close, "n": 3,
            "t": START_MS}


def _price(forward: float, strike: float, vol: float, call: bool, t: float = T) -> float:
    return math.exp(-R * t) * black(forward, strike, vol, t, 1.0 if call else -1.0)


def _chain(forward: float, vol: float, strikes: list[float], calls: bool = True,
           puts: bool = True) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Contracts and exact (unrounded) Black-76 bars at one forward and a flat vol."""
    contracts, bars = [], {}
    for strike in strikes:
        for call in [c for c, wanted in ((True, calls), (False, puts)) if wanted]:
            contracts.append(_contract(strike, call))
            bars[_ticker(EXPIRY, strike, call)] = _bar(_price(forward, strike, vol, call))
    return contracts, bars


def _rows(result: rec.ReconstructedDay) -> dict[str, dict[str, Any]]:
    return {row["contract_ticker"]: row for row in result.table.to_pylist()}


# --- synthetic chains ----------------------------------------------------------------------------

@pytest.mark.parametrize("call", [True, False])
def test_black76_round_trips(call: bool) -> None:
    worst = 0.0
    for strike in (50.0, 80.0, 100.0, 125.0, 200.0):
        for t in (2 / 365, 30 / 365, 1.0, 2.0):
            for vol in (0.05, 0.3, 1.2, 3.0):
                price = black(100.0, strike, vol, t, 1.0 if call else -1.0)
                intrinsic = max(100.0 - strike if call else strike - 100.0, 0.0)
                if price - intrinsic < 1e-8:  # no time value left to invert
                    continue
                iv, reason = rec.black76_iv(price, 100.0, strike, t, call)
                assert reason is None and iv is not None
                worst = max(worst, abs(iv - vol))
    assert worst < 1e-9


def test_black76_bounds_are_reported_not_clamped() -> None:
    assert rec.black76_iv(100.0, 100.0, 90.0, 0.5, True) == (None, "outside_bounds")  # = maximum F
    assert rec.black76_iv(5.0, 100.0, 90.0, 0.5, True) == (None, "outside_bounds")  # < intrinsic
    assert rec.black76_iv(95.0, 100.0, 95.0, 0.5, False) == (None, "outside_bounds")  # = maximum K
    assert rec.black76_iv(50.0, 100.0, 50.0, 0.01, True) == (None, "outside_bounds")  # = intrinsic


def test_rate_is_linear_in_days_flat_outside_and_continuous() -> None:
    curve = {"date": D.isoformat(), "yield_1_month": 4.0, "yield_1_year": 5.0,
             "yield_10_year": None, "yield_30_year": 6.0, "note": "ignored"}
    one_month = 365 / 12
    days = np.array([1.0, one_month, 200.0, 365.0, 5000.0, 20000.0])
    expected_pct = [4.0, 4.0, 4.0 + (200 - one_month) / (365 - one_month), 5.0,
                    5.0 + (5000 - 365) / (30 * 365 - 365), 6.0]  # 10-year missing: skipped
    got = rec.continuous_rate(curve, days)
    assert got == pytest.approx([math.log(1 + y / 100) for y in expected_pct], abs=1e-15)
    with pytest.raises(ValueError, match="no yield"):
        rec.continuous_rate({"date": D.isoformat(), "yield_1_month": None}, 30.0)


def test_curve_from_after_the_day_is_refused() -> None:
    later = dict(CURVE, date=(D + timedelta(days=1)).isoformat())
    with pytest.raises(ValueError, match="not known then"):
        rec.reconstruct_day(D, [], {}, 100.0, later)


def test_dividends_known_on_the_day_with_ex_date_before_expiry() -> None:
    def div(amount: float, declared: date | None, ex: date) -> dict[str, Any]:
        return {"cash_amount": amount, "ex_dividend_date": ex.isoformat(), "pay_date": None,
                "declaration_date": declared.isoformat() if declared else None}

    dividends = [
        div(1.0, D - timedelta(days=10), D + timedelta(days=5)),  # in
        div(0.5, D - timedelta(days=30), EXPIRY),  # in: ex-date on expiry
        div(7.0, D + timedelta(days=1), D + timedelta(days=20)),  # declared after D
        div(7.0, D - timedelta(days=30), D),  # ex-date on D: already paid out
        div(7.0, D - timedelta(days=30), EXPIRY + timedelta(days=1)),  # after expiry
        div(7.0, None, D + timedelta(days=20)),  # no declaration date: not known on D
    ]
    expected = math.exp(-R * 5 / 365) + 0.5 * math.exp(-R * T)
    assert rec.dividend_pv(dividends, D, EXPIRY, CURVE) == pytest.approx(expected, rel=1e-12)


def test_parity_forward_at_the_smallest_call_put_gap() -> None:
    pairs = [(90.0, 12.0, 1.5), (100.0, 5.2, 4.9), (110.0, 1.0, 9.0)]
    assert rec.parity_forward(pairs, R, T) == pytest.approx(100.0 + math.exp(R * T) * 0.3)
    assert rec.parity_forward([], R, T) is None


def test_forward_from_parity_recovers_a_hidden_carry() -> None:
    spot, q, vol = 100.0, 0.03, 0.35  # the forward carries a dividend yield nobody was told of
    forward = spot * math.exp((R - q) * T)
    contracts, bars = _chain(forward, vol, [80.0, 90.0, 95.0, 100.0, 105.0, 110.0, 125.0])
    result = rec.reconstruct_day(D, contracts, bars, spot, CURVE)
    ivs = [row["implied_volatility"] for row in _rows(result).values()]
    assert result.not_inverted == {} and result.inverted == 7 and result.from_otm == 7
    assert max(abs(iv - vol) for iv in ivs) < 1e-9
    # The parity forward's spot delta: call minus put delta is e^{-qT} at every strike.
    by_strike: dict[float, dict[str, float]] = {}
    for row in _rows(result).values():
        by_strike.setdefault(row["strike_price"], {})[row["option_type"]] = row["delta"]
    for deltas in by_strike.values():
        assert deltas["C"] - deltas["P"] == pytest.approx(math.exp(-q * T), abs=1e-9)


def test_forward_falls_back_to_spot_less_dividends() -> None:
    spot, vol = 100.0, 0.4
    dividends = [{"cash_amount": 2.0, "ex_dividend_date": (D + timedelta(days=10)).isoformat(),
                  "declaration_date": (D - timedelta(days=20)).isoformat(), "pay_date": None}]
    forward = (spot - 2.0 * math.exp(-R * 10 / 365)) * math.exp(R * T)
    strikes = [90.0, 100.0, 110.0, 120.0]
    contracts, bars = _chain(forward, vol, strikes, puts=False)  # no put: no parity pair
    result = rec.reconstruct_day(D, contracts, bars, spot, CURVE, dividends)
    rows = _rows(result)
    otm = [rows[_ticker(EXPIRY, k, True)]["implied_volatility"] for k in strikes if k >= forward]
    assert len(otm) == 3 and max(abs(iv - vol) for iv in otm) < 1e-9
    assert rows[_ticker(EXPIRY, 90.0, True)]["implied_volatility"] is None  # ITM, no OTM put
    assert result.not_inverted == {"no_otm_iv": 1}
    undiv = _rows(rec.reconstruct_day(D, contracts, bars, spot, CURVE, []))
    assert abs(undiv[_ticker(EXPIRY, 110.0, True)]["implied_volatility"] - vol) > 1e-3


def test_in_the_money_takes_the_out_of_the_money_iv() -> None:
    spot, vol = 100.0, 0.3
    forward = spot * math.exp(R * T)
    contracts, bars = _chain(forward, vol, [90.0, 100.0, 110.0])  # parity at 100: exact forward
    # American early exercise: the ITM closes carry a premium, even one above Black's maximum.
    bars[_ticker(EXPIRY, 90.0, True)] = _bar(15.0)
    bars[_ticker(EXPIRY, 110.0, False)] = _bar(150.0)
    rows = _rows(rec.reconstruct_day(D, contracts, bars, spot, CURVE))
    for strike, itm, otm in ((90.0, True, False), (110.0, False, True)):
        mine, theirs = rows[_ticker(EXPIRY, strike, itm)], rows[_ticker(EXPIRY, strike, otm)]
        assert mine["implied_volatility"] == theirs["implied_volatility"]
        assert mine["implied_volatility"] == pytest.approx(vol, abs=1e-9)
        assert mine["gamma"] == pytest.approx(theirs["gamma"]) and mine["delta"] * theirs["delta"] < 0


def test_every_not_inverted_reason_is_counted() -> None:
    spot, vol = 100.0, 0.3
    forward = spot * math.exp(R * T)  # 100.49: the call at 100 is in the money
    contracts, bars = _chain(forward, vol, [100.0, 105.0, 110.0, 115.0, 120.0])
    del bars[_ticker(EXPIRY, 100.0, False)]  # no trade: and the ITM call at 100 gets no IV
    del bars[_ticker(EXPIRY, 105.0, True)]  # no trade: nor the ITM put at 105
    bars[_ticker(EXPIRY, 110.0, True)] = _bar(2.0, volume=0)
    bars[_ticker(EXPIRY, 115.0, True)] = _bar(0.04)
    contracts.append(_contract(130.0, True, expiry=D))  # expires on D
    bars[_ticker(D, 130.0, True)] = _bar(1.0)
    later = D + timedelta(days=10)  # a lone call: forward S e^{rT}; its close is above the maximum
    contracts.append(_contract(150.0, True, expiry=later))
    bars[_ticker(later, 150.0, True)] = _bar(200.0)
    result = rec.reconstruct_day(D, contracts, bars, spot, CURVE)
    assert result.not_inverted == {
        "expiring": 1, "no_bar": 2, "zero_volume": 1, "close_below_min": 1, "outside_bounds": 1,
        "no_otm_iv": 4,  # the call at 100 and the puts at 105, 110 and 115: no OTM IV
    }
    assert result.inverted == 1 and result.from_otm == 1 and result.rows == 12  # the pair at 120
    table = result.table
    for column in ("implied_volatility", "delta", "gamma", "theta", "vega"):
        assert table.column(column).null_count == 10


def test_no_forward_and_failed_inversions_are_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    contracts, bars = _chain(100.0, 0.3, [100.0, 110.0], puts=False)
    result = rec.reconstruct_day(D, contracts, bars, None, CURVE)  # no pair, no underlying close
    assert result.not_inverted == {"no_forward": 2} and result.inverted == 0

    def refuse(*args: float) -> float:
        raise ZeroDivisionError("refused")

    monkeypatch.setattr(rec, "_lbr_iv", refuse)  # our own seam to the library
    result = rec.reconstruct_day(D, contracts, bars, 100.0, CURVE)
    assert result.not_inverted == {"inversion_failed": 1, "no_otm_iv": 1}


def test_non_standard_deliverables_and_other_types_are_rejected() -> None:
    contracts = [
        _contract(100.0, True),
        _contract(100.0, False, additional_underlyings=[]),  # empty: standard
        _contract(105.0, True, shares_per_contract=10),
        _contract(110.0, True, additional_underlyings=[{"type": "equity", "underlying": "X",
                                                         "amount": 50}]),
        _contract(115.0, True, contract_type="other"),
        _contract(120.0, True, expiration_date="someday"),
        _contract(125.0, True, ticker="O:TST-125"),  # not an OCC symbol
        _contract(130.0, True, ticker=_ticker(EXPIRY, 130.0, False)),  # a put by its symbol
    ]
    result = rec.reconstruct_day(D, contracts, {}, 100.0, CURVE)
    assert result.rejected == {"non_standard_deliverable": 2, "contract_type_other": 1,
                               "malformed": 3}
    assert result.rows == 2 and result.not_inverted == {"no_bar": 2}


def test_rows_carry_bar_open_interest_and_identity() -> None:
    contracts, bars = _chain(100.0, 0.3, [100.0, 110.0])
    del bars[_ticker(EXPIRY, 110.0, False)]
    oi = {_ticker(EXPIRY, 100.0, True): 1234}
    result = rec.reconstruct_day(D, contracts, bars, 99.5, CURVE, [], oi, underlying_symbol="TST")
    assert result.table.schema == rec.SCHEMA
    rows = _rows(result)
    traded, untraded = rows[_ticker(EXPIRY, 100.0, True)], rows[_ticker(EXPIRY, 110.0, False)]
    assert traded["open_interest"] == 1234 and untraded["open_interest"] is None
    assert traded["volume"] == 10 and untraded["volume"] == 0
    assert traded["last"] == bars[_ticker(EXPIRY, 100.0, True)]["c"] and untraded["last"] is None
    assert traded["day_updated_at"] == datetime.fromtimestamp(START_MS / 1000, UTC)
    assert untraded["day_updated_at"] is None
    assert traded["expiration_date"] == EXPIRY and traded["option_type"] == "C"
    for row in (traded, untraded):
        assert (row["bid"], row["ask"], row["underlying_price"], row["source"]) == (
            None, None, 99.5, "reconstructed")
        assert (row["underlying_symbol"], row["shares_per_contract"]) == ("TST", 100)
    without_oi = rec.reconstruct_day(D, contracts, bars, 99.5, CURVE)
    assert without_oi.table.column("open_interest").null_count == without_oi.rows


def test_columns_have_the_snapshot_pages_types() -> None:
    # reconstruction keeps its own schema (importing the dlt source from it would cycle once the
    # source calls reconstruct_day); this keeps the two from drifting apart.
    from loaders.polygon import ARROW_SCHEMA

    for column in rec.SCHEMA:
        assert ARROW_SCHEMA.field(column.name).type == column.type, column.name


def test_a_bar_of_another_day_is_refused() -> None:
    contracts, bars = _chain(100.0, 0.3, [100.0])
    bars[_ticker(EXPIRY, 100.0, True)]["t"] = START_MS - 86_400_000
    with pytest.raises(ValueError, match="not " + D.isoformat()):
        rec.reconstruct_day(D, contracts, bars, 100.0, CURVE)


# --- against the simulator's truth ---------------------------------------------------------------

_bench_spec = importlib.util.spec_from_file_location(
    "bench_iv_inversion", Path(__file__).resolve().parent.parent / "bench" / "iv_inversion.py")
assert _bench_spec and _bench_spec.loader
bench = importlib.util.module_from_spec(_bench_spec)
_bench_spec.loader.exec_module(bench)
# Today, about a month and about five months earlier (trading days, whatever today is).
DAYS = [D, trading_days(D - timedelta(days=40), D)[0], trading_days(D - timedelta(days=150), D)[0]]
SYMBOLS = ["AAPL", "SPY", "TSLA", "I:SPX"]


@lru_cache(maxsize=16)
def _compared(symbol: str, day: date) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(reconstructed row, snapshot contract) of the OTM contracts with close >= 0.20, DTE >= 2."""
    market = Market(42)
    inputs = bench.simulated_day(market, symbol, day)
    rows = _rows(rec.reconstruct_day(**inputs))
    q, spot = market.profile(symbol).div_yield, inputs["underlying_close"]
    pairs = []
    for contract in market.chain(symbol, day):
        row = rows[contract["details"]["ticker"]]
        dte = (row["expiration_date"] - day).days
        forward = spot * math.exp((RATE - q) * dte / 365)  # the model's own forward
        otm = row["strike_price"] >= forward if row["option_type"] == "C" else row["strike_price"] < forward
        if otm and dte >= 2 and row["last"] is not None and row["last"] >= 0.20 and "greeks" in contract:
            pairs.append((row, contract))
    assert len(pairs) > 100
    return pairs


@pytest.mark.parametrize("day", DAYS, ids=str)
@pytest.mark.parametrize("symbol", SYMBOLS)
def test_iv_and_delta_match_the_snapshot(symbol: str, day: date) -> None:
    pairs = _compared(symbol, day)
    found = [(row, c) for row, c in pairs if row["implied_volatility"] is not None]
    assert len(found) >= 0.95 * len(pairs)
    errors = np.array([abs(row["implied_volatility"] - c["implied_volatility"]) for row, c in found])
    assert np.mean(errors <= 0.005) >= 0.95, f"median {np.median(errors):.2e}"
    assert max(abs(row["delta"] - c["greeks"]["delta"]) for row, c in found) <= 0.02


@pytest.mark.parametrize("day", DAYS[:2], ids=str)
@pytest.mark.parametrize("symbol", SYMBOLS)
def test_gamma_theta_vega_match_the_snapshot(symbol: str, day: date) -> None:
    # A close rounded to $0.01 moves the IV by up to ~0.002 on these contracts, and a greek's
    # relative sensitivity to vol (|d1 d2| / vol for gamma and vega) reaches ~10 in the wings:
    # ~2%; the snapshot rounds greeks to 6 decimals: 1e-6 is two of its units.
    for row, contract in _compared(symbol, day):
        if row["implied_volatility"] is None:
            continue
        for greek in ("gamma", "theta", "vega"):
            truth = contract["greeks"][greek]
            assert abs(row[greek] - truth) <= 0.03 * abs(truth) + 1e-6, (greek, row, contract)
