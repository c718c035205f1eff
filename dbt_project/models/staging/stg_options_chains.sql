-- Plain renames in a single select, without the usual source/renamed CTEs: PostgreSQL does not
-- flatten a view that has CTEs into the query using it, and only a flattened view lets
-- `max(snapshot_at)` / `order by ... limit 1` lookups run as backward index scans on
-- (ticker_id, time) in every partition instead of reading all of a ticker's rows.
select

    ----------  ids
    ticker_id,
    contract_ticker,

    ---------- contract
    option_type,
    expiration_date,
    strike_price,

    ---------- greeks and activity
    implied_volatility,
    delta,
    open_interest,
    volume,
    underlying_price,

    ---------- provenance: 'snapshot' (live) or 'reconstructed' (rebuilt from history)
    source,

    ---------- timestamps
    day_updated_at,
    time as snapshot_at

from {{ source('kapman', 'options_chains') }}
