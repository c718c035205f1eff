-- Constant-maturity IVs per ticker and date from the per-expiry smile points: the expiry at
-- exactly N days, else linear interpolation in total variance (w = iv^2 * DTE / 365) between
-- the nearest expiries either side, else flat extrapolation from the nearest one (flagged).
with

smile_points as (

    select * from {{ ref('int_expiry_smile_points') }}

),

-- One row per expiry and smile series.
series_points as (

    select
        ticker_id,
        as_of_date,
        dte_days,
        'atm' as series,
        atm_iv as implied_volatility
    from smile_points
    where atm_iv is not null

    union all

    select
        ticker_id,
        as_of_date,
        dte_days,
        'call_25' as series,
        call_25_delta_iv as implied_volatility
    from smile_points
    where call_25_delta_iv is not null

    union all

    select
        ticker_id,
        as_of_date,
        dte_days,
        'put_25' as series,
        put_25_delta_iv as implied_volatility
    from smile_points
    where put_25_delta_iv is not null

),

-- The outputs: output_name is the key the extrapolation diagnostic is named after.
maturities as (

    select
        output_name,
        series,
        maturity_days
    from (
        values
        ('atm_iv_30d', 'atm', 30),
        ('atm_iv_90d', 'atm', 90),
        ('iv_skew_call', 'call_25', 30),
        ('iv_skew_put', 'put_25', 30)
    ) as maturities (output_name, series, maturity_days)

),

neighbours as (

    select
        series_points.ticker_id,
        series_points.as_of_date,
        maturities.output_name,
        maturities.maturity_days,
        max(series_points.implied_volatility) filter (
            where series_points.dte_days = maturities.maturity_days
        ) as iv_exact,
        max(series_points.dte_days) filter (
            where series_points.dte_days < maturities.maturity_days
        ) as dte_below,
        (
            array_agg(series_points.implied_volatility order by series_points.dte_days desc)
            filter (where series_points.dte_days < maturities.maturity_days)
        )[1] as iv_below,
        min(series_points.dte_days) filter (
            where series_points.dte_days > maturities.maturity_days
        ) as dte_above,
        (
            array_agg(series_points.implied_volatility order by series_points.dte_days)
            filter (where series_points.dte_days > maturities.maturity_days)
        )[1] as iv_above
    from series_points
    inner join maturities on series_points.series = maturities.series
    group by
        series_points.ticker_id,
        series_points.as_of_date,
        maturities.output_name,
        maturities.maturity_days

),

variances as (

    select
        *,
        iv_below ^ 2 * dte_below / 365.0 as variance_below,
        iv_above ^ 2 * dte_above / 365.0 as variance_above
    from neighbours

),

interpolated as (

    select
        ticker_id,
        as_of_date,
        output_name,
        maturity_days,
        variance_below
        + (variance_above - variance_below)
        * (maturity_days - dte_below)
        / (dte_above - dte_below) as variance_at_maturity,
        iv_exact,
        iv_below,
        iv_above,
        iv_exact is null and (dte_below is null) != (dte_above is null) as is_extrapolated
    from variances

),

constant_maturity as (

    select
        ticker_id,
        as_of_date,
        output_name,
        is_extrapolated,
        case
            when iv_exact is not null then iv_exact
            when is_extrapolated then coalesce(iv_below, iv_above)
            when variance_at_maturity > 0
                then sqrt(variance_at_maturity / (maturity_days / 365.0))
        end as implied_volatility
    from interpolated

),

pivoted as (

    select
        ticker_id,
        as_of_date,
        max(implied_volatility) filter (where output_name = 'atm_iv_30d') as atm_iv_30d,
        max(implied_volatility) filter (where output_name = 'atm_iv_90d') as atm_iv_90d,
        max(implied_volatility) filter (where output_name = 'iv_skew_call')
            as call_25_delta_iv_30d,
        max(implied_volatility) filter (where output_name = 'iv_skew_put')
            as put_25_delta_iv_30d,
        coalesce(bool_or(is_extrapolated) filter (where output_name = 'atm_iv_30d'), false)
            as is_atm_iv_30d_extrapolated,
        coalesce(bool_or(is_extrapolated) filter (where output_name = 'atm_iv_90d'), false)
            as is_atm_iv_90d_extrapolated,
        coalesce(bool_or(is_extrapolated) filter (where output_name = 'iv_skew_call'), false)
            as is_call_25_delta_iv_30d_extrapolated,
        coalesce(bool_or(is_extrapolated) filter (where output_name = 'iv_skew_put'), false)
            as is_put_25_delta_iv_30d_extrapolated
    from constant_maturity
    group by ticker_id, as_of_date

)

select * from pivoted
