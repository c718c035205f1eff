-- A single select (see stg_options_chains): the fill_missing lookup by (time, ticker_id) must
-- reach the primary key through this view.
select

    ----------  ids
    ticker_id,

    ---------- payload
    volatility_metrics_json,
    metrics_model_version,

    ---------- timestamps
    time as snapshot_at,
    metrics_updated_at

from {{ source('kapman', 'daily_snapshots') }}
