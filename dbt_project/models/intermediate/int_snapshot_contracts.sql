-- The contracts of each chosen options snapshot that have not expired (DTE >= 0), with the
-- inputs every metric shares: DTE from the trading date, IV validity, null activity as 0
-- (negative activity too: no count at all, like a missing one, never one that cancels others),
-- and a stale day bar's volume as 0.
-- A lateral lookup per snapshot, fenced with `offset 0`, keeps the read on the (ticker_id, time)
-- index whatever the planner thinks of options_chains (its statistics lag right after an
-- ingestion, and its estimates favour one hash join over all history); a table, so that the
-- models below plan on this run's real row counts.
with

options_snapshots as (

    select * from {{ ref('int_options_snapshots') }}

),

options_chains as not materialized (

    select * from {{ ref('stg_options_chains') }}

),

contracts as (

    select
        options_snapshots.ticker_id,
        options_snapshots.as_of_date,
        snapshot_contracts.contract_ticker,
        snapshot_contracts.option_type,
        snapshot_contracts.expiration_date,
        snapshot_contracts.expiration_date - options_snapshots.as_of_date as dte_days,
        snapshot_contracts.implied_volatility,
        snapshot_contracts.delta,
        greatest(snapshot_contracts.open_interest, 0) as open_interest,  -- null -> 0
        -- A contract that did not trade in the snapshot's session still shows the last session's
        -- day bar: its volume counts only when the bar is from the session (New York date of
        -- day_updated_at not before that of the row's time); an unknown bar time keeps it.
        case
            when
                (snapshot_contracts.day_updated_at at time zone 'America/New_York')::date
                < (options_snapshots.options_snapshot_at at time zone 'America/New_York')::date
                then 0
            else greatest(snapshot_contracts.volume, 0)
        end as volume,
        coalesce(
            snapshot_contracts.implied_volatility > 0
            and snapshot_contracts.implied_volatility <= 5,
            false
        ) as is_iv_valid
    from options_snapshots
    cross join lateral (  -- noqa: ST05
        select
            options_chains.contract_ticker,
            options_chains.option_type,
            options_chains.expiration_date,
            options_chains.implied_volatility,
            options_chains.delta,
            options_chains.open_interest,
            options_chains.volume,
            options_chains.day_updated_at
        from options_chains
        where
            options_chains.ticker_id = options_snapshots.ticker_id
            and options_chains.snapshot_at = options_snapshots.options_snapshot_at
            and options_chains.expiration_date >= options_snapshots.as_of_date
        -- A fence (it skips no row): without it PostgreSQL pulls the subquery up into a hash
        -- join over every partition, a scan of all history (200 ms at 250 days, vs 2 ms).
        offset 0  -- noqa: AM09
    ) as snapshot_contracts

)

select * from contracts
