-- Per-expiry smile points, interpolated linearly in delta (never extrapolated): ATM = mean of
-- the non-null of call IV(+0.50) and put IV(-0.50); c25 = call IV(+0.25); p25 = put IV(-0.25).
with

contracts as (

    select * from {{ ref('int_snapshot_contracts') }}

),

-- The contracts a smile uses, with their option type's target deltas (calls +0.25 and +0.50,
-- puts -0.25 and -0.50).
smile_contracts as not materialized (

    select
        ticker_id,
        as_of_date,
        expiration_date,
        dte_days,
        option_type,
        delta,
        implied_volatility,
        case when option_type = 'C' then 0.25 else -0.25 end::double precision
            as wing_target_delta,
        case when option_type = 'C' then 0.50 else -0.50 end::double precision
            as atm_target_delta
    from contracts
    where
        is_iv_valid
        and dte_days >= 1
        and (
            (option_type = 'C' and delta > 0 and delta < 1)
            or (option_type = 'P' and delta > -1 and delta < 0)
        )

),

-- The nearest deltas either side of each target, per expiry and option type.
brackets as (

    select
        ticker_id,
        as_of_date,
        expiration_date,
        dte_days,
        option_type,
        wing_target_delta,
        atm_target_delta,
        max(delta) filter (where delta <= wing_target_delta) as wing_delta_lo,
        min(delta) filter (where delta >= wing_target_delta) as wing_delta_hi,
        max(delta) filter (where delta <= atm_target_delta) as atm_delta_lo,
        min(delta) filter (where delta >= atm_target_delta) as atm_delta_hi
    from smile_contracts
    group by
        ticker_id,
        as_of_date,
        expiration_date,
        dte_days,
        option_type,
        wing_target_delta,
        atm_target_delta

),

-- The IV at each bracketing delta: the mean over the contracts sharing that delta.
bracket_ivs as (

    select
        brackets.ticker_id,
        brackets.as_of_date,
        brackets.expiration_date,
        brackets.dte_days,
        brackets.option_type,
        brackets.wing_target_delta,
        brackets.wing_delta_lo,
        brackets.wing_delta_hi,
        brackets.atm_target_delta,
        brackets.atm_delta_lo,
        brackets.atm_delta_hi,
        avg(smile_contracts.implied_volatility)
        filter (where smile_contracts.delta = brackets.wing_delta_lo) as wing_iv_lo,
        avg(smile_contracts.implied_volatility)
        filter (where smile_contracts.delta = brackets.wing_delta_hi) as wing_iv_hi,
        avg(smile_contracts.implied_volatility)
        filter (where smile_contracts.delta = brackets.atm_delta_lo) as atm_iv_lo,
        avg(smile_contracts.implied_volatility)
        filter (where smile_contracts.delta = brackets.atm_delta_hi) as atm_iv_hi
    from brackets
    inner join smile_contracts
        on
            brackets.ticker_id = smile_contracts.ticker_id
            and brackets.as_of_date = smile_contracts.as_of_date
            and brackets.expiration_date = smile_contracts.expiration_date
            and brackets.option_type = smile_contracts.option_type
            and smile_contracts.delta in (
                brackets.wing_delta_lo,
                brackets.wing_delta_hi,
                brackets.atm_delta_lo,
                brackets.atm_delta_hi
            )
    group by
        brackets.ticker_id,
        brackets.as_of_date,
        brackets.expiration_date,
        brackets.dte_days,
        brackets.option_type,
        brackets.wing_target_delta,
        brackets.wing_delta_lo,
        brackets.wing_delta_hi,
        brackets.atm_target_delta,
        brackets.atm_delta_lo,
        brackets.atm_delta_hi

),

-- One row per target: IV(t) = IV_lo + (IV_hi - IV_lo) x (t - delta_lo) / (delta_hi - delta_lo),
-- IV_lo on an exact hit, null unless both sides exist.
interpolated as (

    select
        bracket_ivs.ticker_id,
        bracket_ivs.as_of_date,
        bracket_ivs.expiration_date,
        bracket_ivs.dte_days,
        bracket_ivs.option_type,
        targets.target_name,
        case
            when targets.delta_lo is null or targets.delta_hi is null then null
            when targets.delta_hi = targets.delta_lo then targets.iv_lo
            else
                targets.iv_lo
                + (targets.iv_hi - targets.iv_lo)
                * (targets.target_delta - targets.delta_lo)
                / (targets.delta_hi - targets.delta_lo)
        end as implied_volatility
    from bracket_ivs
    cross join lateral (
        values
        (
            'wing',
            bracket_ivs.wing_target_delta,
            bracket_ivs.wing_delta_lo,
            bracket_ivs.wing_delta_hi,
            bracket_ivs.wing_iv_lo,
            bracket_ivs.wing_iv_hi
        ),
        (
            'atm',
            bracket_ivs.atm_target_delta,
            bracket_ivs.atm_delta_lo,
            bracket_ivs.atm_delta_hi,
            bracket_ivs.atm_iv_lo,
            bracket_ivs.atm_iv_hi
        )
    ) as targets (target_name, target_delta, delta_lo, delta_hi, iv_lo, iv_hi)

),

pivoted as (

    select
        ticker_id,
        as_of_date,
        expiration_date,
        dte_days,
        max(implied_volatility) filter (
            where option_type = 'C' and target_name = 'wing'
        ) as call_25_delta_iv,
        max(implied_volatility) filter (
            where option_type = 'C' and target_name = 'atm'
        ) as call_50_delta_iv,
        max(implied_volatility) filter (
            where option_type = 'P' and target_name = 'wing'
        ) as put_25_delta_iv,
        max(implied_volatility) filter (
            where option_type = 'P' and target_name = 'atm'
        ) as put_50_delta_iv
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
