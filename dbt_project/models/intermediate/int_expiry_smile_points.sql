-- Per-expiry smile points, interpolated linearly in delta (never extrapolated): ATM = mean of
-- the non-null of call IV(+0.50) and put IV(-0.50); c25 = call IV(+0.25); p25 = put IV(-0.25).
with

contracts as (

    select * from {{ ref('int_snapshot_contracts') }}

),

-- Contracts sharing a delta count once, at the mean of their IVs.
delta_points as (

    select
        ticker_id,
        as_of_date,
        expiration_date,
        dte_days,
        option_type,
        delta,
        avg(implied_volatility) as implied_volatility
    from contracts
    where
        is_iv_valid
        and dte_days >= 1
        and (
            (option_type = 'C' and delta > 0 and delta < 1)
            or (option_type = 'P' and delta > -1 and delta < 0)
        )
    group by ticker_id, as_of_date, expiration_date, dte_days, option_type, delta

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

brackets as (

    select
        delta_points.ticker_id,
        delta_points.as_of_date,
        delta_points.expiration_date,
        delta_points.dte_days,
        targets.target_name,
        targets.target_delta,
        max(delta_points.delta)
        filter (where delta_points.delta <= targets.target_delta) as delta_lo,
        min(delta_points.delta)
        filter (where delta_points.delta >= targets.target_delta) as delta_hi,
        (
            array_agg(delta_points.implied_volatility order by delta_points.delta desc)
            filter (where delta_points.delta <= targets.target_delta)
        )[1] as iv_lo,
        (
            array_agg(delta_points.implied_volatility order by delta_points.delta)
            filter (where delta_points.delta >= targets.target_delta)
        )[1] as iv_hi
    from delta_points
    inner join targets on delta_points.option_type = targets.option_type
    group by
        delta_points.ticker_id,
        delta_points.as_of_date,
        delta_points.expiration_date,
        delta_points.dte_days,
        targets.target_name,
        targets.target_delta

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
    from brackets

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
