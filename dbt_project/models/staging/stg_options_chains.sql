-- Plain column renames only: no expression on time or ticker_id, so that lookups through this
-- view keep using the (ticker_id, time) index of every partition.
with

source as (

    select * from {{ source('kapman', 'options_chains') }}

),

renamed as (

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

        ---------- timestamps
        time as snapshot_at

    from source

)

select * from renamed
