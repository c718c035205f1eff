-- Per-expiry smile points, interpolated linearly in delta (never extrapolated): ATM = mean of
-- the non-null of call IV(+0.50) and put IV(-0.50); c25 = call IV(+0.25); p25 = put IV(-0.25).
with

contracts as (

    select * from {{ ref('int_snapshot_contracts') }}

),

smile_contracts as (

    select
        ticker_id,
        as_of_date,
        expiration_date,
        dte_days,
        option_type,
        delta,
        implied_volatility
    from contracts
    where
        is_iv_valid
        and dte_days >= 1
        and (
            (option_type = 'C' and delta > 0 and delta < 1)
            or (option_type = 'P' and delta > -1 and delta < 0)
        )

),

targets as (

    select
        target_name,
        option_type,
        target_delta::double precision as target_delta
    from (
        values
        ('call_25', 'C', 0.25),
        ('call_50', 'C', 0.50),
        ('put_25', 'P', -0.25),
        ('put_50', 'P', -0.50)
    ) as targets (target_name, option_type, target_delta)

),

-- The nearest deltas either side of each target, per expiry.
brackets as (

    select
        smile_contracts.ticker_id,
        smile_contracts.as_of_date,
        smile_contracts.expiration_date,
        smile_contracts.dte_days,
        smile_contracts.option_type,
        targets.target_name,
        targets.target_delta,
        max(smile_contracts.delta)
        filter (where smile_contracts.delta <= targets.target_delta) as delta_lo,
        min(smile_contracts.delta)
        filter (where smile_contracts.delta >= targets.target_delta) as delta_hi
    from smile_contracts
    inner join targets on smile_contracts.option_type = targets.option_type
    group by
        smile_contracts.ticker_id,
        smile_contracts.as_of_date,
        smile_contracts.expiration_date,
        smile_contracts.dte_days,
        smile_contracts.option_type,
        targets.target_name,
        targets.target_delta

),

-- The IV at each bracketing delta: the mean over the contracts sharing that delta.
bracket_ivs as (

    select
        brackets.ticker_id,
        brackets.as_of_date,
        brackets.expiration_date,
        brackets.dte_days,
        brackets.target_name,
        brackets.target_delta,
        brackets.delta_lo,
        brackets.delta_hi,
        avg(smile_contracts.implied_volatility)
        filter (where smile_contracts.delta = brackets.delta_lo) as iv_lo,
        avg(smile_contracts.implied_volatility)
        filter (where smile_contracts.delta = brackets.delta_hi) as iv_hi
    from brackets
    inner join smile_contracts
        on
            brackets.ticker_id = smile_contracts.ticker_id
            and brackets.as_of_date = smile_contracts.as_of_date
            and brackets.expiration_date = smile_contracts.expiration_date
            and brackets.option_type = smile_contracts.option_type
            and smile_contracts.delta in (brackets.delta_lo, brackets.delta_hi)
    group by
        brackets.ticker_id,
        brackets.as_of_date,
        brackets.expiration_date,
        brackets.dte_days,
        brackets.target_name,
        brackets.target_delta,
        brackets.delta_lo,
        brackets.delta_hi

),

interpolated as (

    select
        ticker_id,
        as_of_date,
        expiration_date,
        dte_days,
        target_name,
        case
            when delta_lo is null or delta_hi is null then null
            when delta_hi = delta_lo then iv_lo
            else
                iv_lo
                + (iv_hi - iv_lo) * (target_delta - delta_lo) / (delta_hi - delta_lo)
        end as implied_volatility
    from bracket_ivs

),

pivoted as (

    select
        ticker_id,
        as_of_date,
        expiration_date,
        dte_days,
        max(implied_volatility) filter (where target_name = 'call_25') as call_25_delta_iv,
        max(implied_volatility) filter (where target_name = 'call_50') as call_50_delta_iv,
        max(implied_volatility) filter (where target_name = 'put_25') as put_25_delta_iv,
        max(implied_volatility) filter (where target_name = 'put_50') as put_50_delta_iv
    from interpolated
    group by ticker_id, as_of_date, expiration_date, dte_days

),

smile_points as (

    select
        ticker_id,
        as_of_date,
        expiration_date,
        dte_days,
        call_25_delta_iv,
        put_25_delta_iv,
        case
            when call_50_delta_iv is null then put_50_delta_iv
            when put_50_delta_iv is null then call_50_delta_iv
            else (call_50_delta_iv + put_50_delta_iv) / 2
        end as atm_iv
    from pivoted

)

select * from smile_points
