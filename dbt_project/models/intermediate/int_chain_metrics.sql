-- Chain-wide metrics per ticker and date over the contracts with DTE >= 0: put/call ratios,
-- oi_ratio, average_iv and the counts. Sums run in numeric: exact, so independent of row order.
with

contracts as (

    select * from {{ ref('int_snapshot_contracts') }}

),

-- Per expiry and option type first: hash aggregation over few groups, so the distinct count
-- of expiries below needs no sort of the whole chain.
expiry_sums as (

    select
        ticker_id,
        as_of_date,
        expiration_date,
        option_type,
        count(*) as contracts_count,
        count(*) filter (where is_iv_valid) as contracts_with_iv_count,
        sum(open_interest) as open_interest,
        sum(volume) as volume,
        -- average_iv: IV-valid contracts with DTE >= 1
        count(*) filter (where is_iv_valid and dte_days >= 1) as iv_contracts_count,
        sum(open_interest) filter (where is_iv_valid and dte_days >= 1) as iv_open_interest,
        sum(implied_volatility::numeric * open_interest)
        filter (where is_iv_valid and dte_days >= 1) as iv_open_interest_product,
        sum(implied_volatility::numeric)
        filter (where is_iv_valid and dte_days >= 1) as iv_sum
    from contracts
    group by ticker_id, as_of_date, expiration_date, option_type

),

sums as (

    select
        ticker_id,
        as_of_date,
        sum(contracts_count) as contracts_count,
        sum(contracts_with_iv_count) as contracts_with_iv_count,
        coalesce(sum(contracts_count) filter (where option_type = 'C'), 0) as calls_count,
        coalesce(sum(contracts_count) filter (where option_type = 'P'), 0) as puts_count,
        count(distinct expiration_date) as expiries_count,
        coalesce(sum(open_interest) filter (where option_type = 'P'), 0) as put_open_interest,
        coalesce(sum(open_interest) filter (where option_type = 'C'), 0) as call_open_interest,
        coalesce(sum(volume) filter (where option_type = 'P'), 0) as put_volume,
        coalesce(sum(volume) filter (where option_type = 'C'), 0) as call_volume,
        sum(open_interest) as open_interest,
        sum(volume) as volume,
        sum(iv_contracts_count) as iv_contracts_count,
        sum(iv_open_interest) as iv_open_interest,
        sum(iv_open_interest_product) as iv_open_interest_product,
        sum(iv_sum) as iv_sum
    from expiry_sums
    group by ticker_id, as_of_date

),

metrics as (

    select
        ticker_id,
        as_of_date,
        contracts_count::integer as contracts_count,
        contracts_with_iv_count::integer as contracts_with_iv_count,
        calls_count::integer as calls_count,
        puts_count::integer as puts_count,
        expiries_count::integer as expiries_count,
        (put_open_interest / nullif(call_open_interest, 0))::double precision
            as put_call_ratio_oi,
        (put_volume / nullif(call_volume, 0))::double precision as put_call_ratio_volume,
        (volume / nullif(open_interest, 0))::double precision as oi_ratio,
        (
            case
                when iv_contracts_count = 0 then null
                when iv_open_interest = 0 then iv_sum / iv_contracts_count
                else iv_open_interest_product / iv_open_interest
            end
        )::double precision as average_iv
    from sums

)

select * from metrics
