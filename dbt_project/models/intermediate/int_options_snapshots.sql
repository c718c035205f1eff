{#-
    One row per (active watchlist ticker, trading date) this run computes, with its options
    snapshot: the latest options_chains time at or before S = D 23:59:59.999999 UTC, found by a
    bounded lookup on the (ticker_id, time) index, and whether it was reconstructed. Rows:
    - requested: the trading dates between vars start_date and end_date (default: the latest
      trading date that has options data); with var fill_missing, published only where
      daily_snapshots has no volatility_metrics_json yet;
    - history: the iv_history_days trading dates before start_date, and requested dates that are
      not published, but only where the mart has no row for that snapshot yet (a first run, a
      late ingestion): the history metrics of the requested dates rank against them.
-#}
{%- set start_date = var('start_date', none) -%}
{%- set end_date = var('end_date', none) -%}

with

trading_days as (

    select * from {{ ref('trading_days') }}

),

watchlists as (

    select * from {{ ref('stg_watchlists') }}

),

tickers as (

    select * from {{ ref('stg_tickers') }}

),

-- Not materialized: used twice, it must still be inlined so that every lookup is an index scan.
options_chains as not materialized (

    select * from {{ ref('stg_options_chains') }}

),

daily_snapshots as not materialized (

    select * from {{ ref('stg_daily_snapshots') }}

),

latest_options_date as (

    select max(trading_days.trading_date) as trading_date
    from trading_days
    where
        trading_days.trading_date <= (
            select (max(options_chains.snapshot_at) at time zone 'utc')::date
            from options_chains
        )

),

date_range as (

    select
        coalesce({{ date_literal(start_date or end_date) }}, trading_date) as start_date,
        coalesce({{ date_literal(end_date or start_date) }}, trading_date) as end_date
    from latest_options_date

),

active_tickers as (

    select distinct
        tickers.ticker_id,
        tickers.symbol
    from watchlists
    inner join tickers on watchlists.symbol = tickers.symbol
    where watchlists.is_active

),

requested_dates as (

    select
        trading_days.trading_date as as_of_date,
        true as is_requested
    from trading_days
    inner join date_range
        on trading_days.trading_date between date_range.start_date and date_range.end_date

),

history_dates as (

    select
        trading_days.trading_date as as_of_date,
        false as is_requested
    from trading_days
    inner join date_range on trading_days.trading_date < date_range.start_date
    order by trading_days.trading_date desc
    limit {{ var('iv_history_days', 252) }}

),

run_dates as (

    select * from requested_dates
    union all
    select * from history_dates

),

candidates as (

    select
        active_tickers.ticker_id,
        active_tickers.symbol,
        run_dates.as_of_date,
        run_dates.is_requested,
        (run_dates.as_of_date + time '23:59:59.999999') at time zone 'utc' as snapshot_at
    from active_tickers
    cross join run_dates

),

chosen_snapshots as (

    select
        candidates.*,
        latest.options_snapshot_at,
        candidates.is_requested
        {%- if var('fill_missing', false) %}
        and not exists (
            select 1
            from daily_snapshots
            where
                daily_snapshots.ticker_id = candidates.ticker_id
                and daily_snapshots.snapshot_at = candidates.snapshot_at
                and jsonb_typeof(daily_snapshots.volatility_metrics_json) <> 'null'
        )
        {%- endif %} as is_published
    from candidates
    cross join lateral (  -- noqa: ST05
        select max(options_chains.snapshot_at) as options_snapshot_at
        from options_chains
        where
            options_chains.ticker_id = candidates.ticker_id
            and options_chains.snapshot_at <= candidates.snapshot_at
    ) as latest

),

to_compute as (

    select
        ticker_id,
        symbol,
        as_of_date,
        snapshot_at,
        options_snapshot_at,
        is_published,
        (options_snapshot_at at time zone 'utc')::date < as_of_date as is_stale,
        -- Any reconstructed row makes the snapshot reconstructed (the diagnostics say so). A
        -- lookup on the partial index of reconstructed rows, evaluated for computed rows only:
        -- a live snapshot has no entry there, so this reads none of its contracts.
        exists(
            select 1
            from options_chains
            where
                options_chains.ticker_id = chosen_snapshots.ticker_id
                and options_chains.snapshot_at = chosen_snapshots.options_snapshot_at
                and options_chains.source = 'reconstructed'
        ) as is_reconstructed
    from chosen_snapshots
    where
        is_published
        or (
            options_snapshot_at is not null
            and not {{ mart_has_snapshot(
                'chosen_snapshots.ticker_id',
                'chosen_snapshots.as_of_date',
                'chosen_snapshots.options_snapshot_at',
            ) }}
        )

)

select * from to_compute
