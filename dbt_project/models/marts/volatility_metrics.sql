{{
    config(
        unique_key=['ticker_id', 'as_of_date'],
        incremental_strategy='delete+insert',
        on_schema_change='append_new_columns',
        indexes=[{'columns': ['ticker_id', 'as_of_date'], 'unique': true}],
        pre_hook=[
            "alter table if exists {{ this }}"
            " add column if not exists is_reconstructed boolean",
        ],
    )
}}
{#-
    One row per ticker per trading date: every metric (full precision), status, counts,
    diagnostics and the published JSON. IV rank and percentile rank against the mart's own
    earlier rows (the iv_history_days most recent non-null values before the date), including
    the earlier dates of this same run. Each row records whether its options snapshot was
    reconstructed, so that later dates can tell when their history holds such a date.
    The pre-hook adds that column to a mart built before it existed: the history below reads
    it from the mart before on_schema_change could append it (older rows: null, i.e. false).
-#}
{%- set history_days = var('iv_history_days', 252) -%}
{%- set min_history = var('iv_min_history', 20) -%}

with

options_snapshots as (

    select * from {{ ref('int_options_snapshots') }}

),

chain_metrics as (

    select * from {{ ref('int_chain_metrics') }}

),

constant_maturity as (

    select * from {{ ref('int_constant_maturity') }}

),

current_metrics as (

    select
        options_snapshots.ticker_id,
        options_snapshots.symbol,
        options_snapshots.as_of_date,
        options_snapshots.snapshot_at,
        options_snapshots.options_snapshot_at,
        options_snapshots.is_stale,
        coalesce(options_snapshots.is_reconstructed, false) as is_reconstructed,
        not options_snapshots.is_published as is_history_only,
        chain_metrics.average_iv,
        chain_metrics.put_call_ratio_oi,
        chain_metrics.put_call_ratio_volume,
        chain_metrics.oi_ratio,
        constant_maturity.atm_iv_30d,
        constant_maturity.atm_iv_90d,
        constant_maturity.atm_iv_90d - constant_maturity.atm_iv_30d as iv_term_structure,
        constant_maturity.put_25_delta_iv_30d - constant_maturity.call_25_delta_iv_30d
            as iv_skew,
        coalesce(constant_maturity.is_atm_iv_30d_extrapolated, false)
            as is_atm_iv_30d_extrapolated,
        coalesce(constant_maturity.is_atm_iv_90d_extrapolated, false)
            as is_atm_iv_90d_extrapolated,
        coalesce(constant_maturity.is_call_25_delta_iv_30d_extrapolated, false)
            as is_call_25_delta_iv_30d_extrapolated,
        coalesce(constant_maturity.is_put_25_delta_iv_30d_extrapolated, false)
            as is_put_25_delta_iv_30d_extrapolated,
        coalesce(chain_metrics.contracts_count, 0) as contracts_count,
        coalesce(chain_metrics.contracts_with_iv_count, 0) as contracts_with_iv_count,
        coalesce(chain_metrics.calls_count, 0) as calls_count,
        coalesce(chain_metrics.puts_count, 0) as puts_count,
        coalesce(chain_metrics.expiries_count, 0) as expiries_count
    from options_snapshots
    left join chain_metrics
        on
            options_snapshots.ticker_id = chain_metrics.ticker_id
            and options_snapshots.as_of_date = chain_metrics.as_of_date
    left join constant_maturity
        on
            options_snapshots.ticker_id = constant_maturity.ticker_id
            and options_snapshots.as_of_date = constant_maturity.as_of_date

),

{% if is_incremental() %}

run_tickers as (

    select
        ticker_id,
        min(as_of_date) as first_as_of_date,
        max(as_of_date) as last_as_of_date
    from current_metrics
    group by ticker_id

),

-- Where each ticker's history starts: the oldest of the iv_history_days most recent non-null
-- values of either series before the run's first date (index range scans on the mart's key).
-- Materialised: inlined, the planner re-ran these lookups for every history row it joined
-- (750 times for 3 tickers at 250 days: 115 ms instead of 5).
history_floors as materialized (

    select
        run_tickers.ticker_id,
        run_tickers.last_as_of_date,
        coalesce(floors.as_of_date, run_tickers.first_as_of_date) as floor_as_of_date
    from run_tickers
    cross join lateral (  -- noqa: ST05
        select min(recent.as_of_date) as as_of_date
        from (
            (
                select mart.as_of_date
                from {{ this }} as mart
                where
                    mart.ticker_id = run_tickers.ticker_id
                    and mart.as_of_date < run_tickers.first_as_of_date
                    and mart.average_iv is not null
                order by mart.as_of_date desc
                limit {{ history_days }}
            )
            union all
            (
                select mart.as_of_date
                from {{ this }} as mart
                where
                    mart.ticker_id = run_tickers.ticker_id
                    and mart.as_of_date < run_tickers.first_as_of_date
                    and mart.atm_iv_30d is not null
                order by mart.as_of_date desc
                limit {{ history_days }}
            )
        ) as recent
    ) as floors

),

prior_metrics as (

    select
        mart.ticker_id,
        mart.as_of_date,
        mart.average_iv,
        mart.atm_iv_30d,
        coalesce(mart.is_reconstructed, false) as is_reconstructed
    from {{ this }} as mart
    inner join history_floors
        on
            mart.ticker_id = history_floors.ticker_id
            and mart.as_of_date >= history_floors.floor_as_of_date
            and mart.as_of_date < history_floors.last_as_of_date
    where not exists (
        select 1
        from current_metrics
        where
            current_metrics.ticker_id = mart.ticker_id
            and current_metrics.as_of_date = mart.as_of_date
    )

),

{% endif %}

metric_series as (

    select
        ticker_id,
        as_of_date,
        average_iv,
        atm_iv_30d,
        is_reconstructed
    from current_metrics
    {% if is_incremental() %}
    union all
    select
        ticker_id,
        as_of_date,
        average_iv,
        atm_iv_30d,
        is_reconstructed
    from prior_metrics
    {% endif %}

),

average_iv_history as (

    {{ iv_history('metric_series', 'average_iv', history_days) }}

),

atm_iv_30d_history as (

    {{ iv_history('metric_series', 'atm_iv_30d', history_days) }}

),

history_metrics as (

    select
        current_metrics.*,
        {{ history_rank('average_iv_history', min_history) }} as iv_rank,
        {{ history_percentile('average_iv_history', min_history) }} as iv_percentile,
        {{ history_rank('atm_iv_30d_history', min_history) }} as iv_rank_30d,
        {{ history_percentile('atm_iv_30d_history', min_history) }} as iv_percentile_30d,
        coalesce(average_iv_history.history_count, 0) as iv_history_count,
        coalesce(atm_iv_30d_history.history_count, 0) as atm_iv_30d_history_count,
        -- the histories actually ranked against (the most recent non-null values)
        coalesce(average_iv_history.has_reconstructed_history, false)
        or coalesce(atm_iv_30d_history.has_reconstructed_history, false)
            as has_reconstructed_history
    from current_metrics
    left join average_iv_history
        on
            current_metrics.ticker_id = average_iv_history.ticker_id
            and current_metrics.as_of_date = average_iv_history.as_of_date
    left join atm_iv_30d_history
        on
            current_metrics.ticker_id = atm_iv_30d_history.ticker_id
            and current_metrics.as_of_date = atm_iv_30d_history.as_of_date

),

-- Values no valid chain can produce (e.g. negative open interest) make the ticker's row an
-- ERROR instead of publishing them: one bad chain never fails the batch.
checked as (

    select
        *,
        case
            when put_call_ratio_oi < 0 then 'put_call_ratio_oi'
            when put_call_ratio_volume < 0 then 'put_call_ratio_volume'
            when oi_ratio < 0 then 'oi_ratio'
            when not average_iv > 0 or average_iv > 5 then 'average_iv'
            when not atm_iv_30d > 0 or atm_iv_30d > 5 then 'atm_iv_30d'
            when not atm_iv_90d > 0 or atm_iv_90d > 5 then 'atm_iv_90d'
        end as out_of_range_metric
    from history_metrics

),

statuses as (

    select
        *,
        case
            when out_of_range_metric is not null then 'ERROR'
            when options_snapshot_at is null then 'MISSING_OPTIONS'
            when average_iv is null then 'PARTIAL'
            else 'SUCCESS'
        end as status
    from checked

),

diagnostic_flags as (

    select
        statuses.ticker_id,
        statuses.as_of_date,
        flags.diagnostic
    from statuses
    cross join
        lateral (
            values
            (
                'error:' || statuses.out_of_range_metric || '_out_of_range',
                statuses.status = 'ERROR'
            ),
            ('missing_options_data', statuses.status = 'MISSING_OPTIONS'),
            ('missing_average_iv', statuses.status = 'PARTIAL'),
            (
                'stale_options_snapshot',
                statuses.status in ('SUCCESS', 'PARTIAL') and statuses.is_stale
            ),
            (
                'reconstructed_chain',
                statuses.status in ('SUCCESS', 'PARTIAL') and statuses.is_reconstructed
            ),
            (
                'history_includes_reconstructed',
                statuses.status != 'ERROR' and statuses.has_reconstructed_history
            ),
            (
                'insufficient_iv_history',
                statuses.status = 'SUCCESS' and statuses.iv_history_count < {{ min_history }}
            ),
            (
                'insufficient_atm_iv_30d_history',
                statuses.status != 'ERROR'
                and statuses.atm_iv_30d is not null
                and statuses.atm_iv_30d_history_count < {{ min_history }}
            ),
            (
                'extrapolated_atm_iv_30d',
                statuses.status != 'ERROR' and statuses.is_atm_iv_30d_extrapolated
            ),
            (
                'extrapolated_atm_iv_90d',
                statuses.status != 'ERROR' and statuses.is_atm_iv_90d_extrapolated
            ),
            (
                'extrapolated_iv_skew_call',
                statuses.status != 'ERROR' and statuses.is_call_25_delta_iv_30d_extrapolated
            ),
            (
                'extrapolated_iv_skew_put',
                statuses.status != 'ERROR' and statuses.is_put_25_delta_iv_30d_extrapolated
            )
        ) as flags (diagnostic, is_raised)
    where flags.is_raised

),

diagnostics as (

    select
        ticker_id,
        as_of_date,
        jsonb_agg(diagnostic order by diagnostic collate "C") as diagnostics
    from diagnostic_flags
    group by ticker_id, as_of_date

),

final as (

    select
        statuses.ticker_id,
        statuses.symbol,
        statuses.as_of_date,
        statuses.snapshot_at,
        statuses.options_snapshot_at,
        statuses.status,
        {%- for metric in metric_columns() %}
        case when statuses.status != 'ERROR' then statuses.{{ metric }} end as {{ metric }},
        {%- endfor %}
        statuses.contracts_count,
        statuses.contracts_with_iv_count,
        statuses.calls_count,
        statuses.puts_count,
        statuses.expiries_count,
        statuses.iv_history_count,
        statuses.atm_iv_30d_history_count,
        coalesce(diagnostics.diagnostics, '[]') as diagnostics,
        statuses.is_reconstructed,
        statuses.is_history_only
    from statuses
    left join diagnostics
        on
            statuses.ticker_id = diagnostics.ticker_id
            and statuses.as_of_date = diagnostics.as_of_date

),

published as (

    select
        *,
        jsonb_build_object(
            'status', status,
            'as_of', to_char(as_of_date, 'YYYY-MM-DD'),
            'options_snapshot_time',
            {{ isoformat_utc('options_snapshot_at') }},
            'metrics', jsonb_build_object(
                {%- for metric in metric_columns() %}
                '{{ metric }}', {{ round6(metric) }}{{ ',' if not loop.last }}
                {%- endfor %}
            ),
            'counts', jsonb_build_object(
                'contracts', contracts_count,
                'contracts_with_iv', contracts_with_iv_count,
                'calls', calls_count,
                'puts', puts_count,
                'expiries', expiries_count
            ),
            'diagnostics', diagnostics
        ) as volatility_metrics_json
    from final

)

select * from published
