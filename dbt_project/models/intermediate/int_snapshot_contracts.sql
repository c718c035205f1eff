{{ config(materialized='view') }}

-- The contracts of each chosen options snapshot that have not expired (DTE >= 0), with the
-- inputs every metric shares: DTE from the trading date, IV validity, null activity as 0.
with

options_snapshots as (

    select * from {{ ref('int_options_snapshots') }}

),

options_chains as (

    select * from {{ ref('stg_options_chains') }}

),

contracts as (

    select
        options_snapshots.ticker_id,
        options_snapshots.as_of_date,
        options_chains.contract_ticker,
        options_chains.option_type,
        options_chains.expiration_date,
        options_chains.expiration_date - options_snapshots.as_of_date as dte_days,
        options_chains.implied_volatility,
        options_chains.delta,
        coalesce(options_chains.open_interest, 0) as open_interest,
        coalesce(options_chains.volume, 0) as volume,
        coalesce(
            options_chains.implied_volatility > 0
            and options_chains.implied_volatility <= 5,
            false
        ) as is_iv_valid
    from options_snapshots
    inner join options_chains
        on
            options_snapshots.ticker_id = options_chains.ticker_id
            and options_snapshots.options_snapshot_at = options_chains.snapshot_at
    where options_chains.expiration_date >= options_snapshots.as_of_date

)

select * from contracts
