{#- The metrics of the published JSON, in the order of the spec. -#}
{% macro metric_columns() -%}
{{ return([
    'average_iv', 'iv_rank', 'iv_percentile', 'iv_rank_30d', 'iv_percentile_30d',
    'put_call_ratio_oi', 'put_call_ratio_volume', 'oi_ratio',
    'atm_iv_30d', 'atm_iv_90d', 'iv_term_structure', 'iv_skew',
]) }}
{%- endmacro %}

{#- One series' history per (ticker, date): its non-null values on the `history_days` earlier
    rows of `relation`, for history_rank and history_percentile, and whether one of those came
    from a reconstructed snapshot (`relation` has a boolean is_reconstructed). -#}
{% macro iv_history(relation, column, history_days) -%}
select
    ticker_id,
    as_of_date,
    {{ column }} as iv_value,
    count(*) over history as history_count,
    min({{ column }}) over history as history_min,
    max({{ column }}) over history as history_max,
    array_agg({{ column }}) over history as history_values,
    coalesce(bool_or(is_reconstructed) over history, false) as has_reconstructed_history
from {{ relation }}
where {{ column }} is not null
window history as (
    partition by ticker_id
    order by as_of_date
    rows between {{ history_days }} preceding and 1 preceding
)
{%- endmacro %}

{#- IV rank of one series against its history: `history` names a relation with iv_value,
    history_count, history_min, history_max; null below min_history points or when max = min. -#}
{% macro history_rank(history, min_history) -%}
case
    when {{ history }}.iv_value is null or {{ history }}.history_count < {{ min_history }}
        then null
    when {{ history }}.history_max = {{ history }}.history_min then null
    else greatest(0, least(100,
        ({{ history }}.iv_value - {{ history }}.history_min)
        / ({{ history }}.history_max - {{ history }}.history_min) * 100
    ))
end
{%- endmacro %}

{#- IV percentile: the share of history strictly below the value, in percent. -#}
{% macro history_percentile(history, min_history) -%}
case
    when {{ history }}.iv_value is null or {{ history }}.history_count < {{ min_history }}
        then null
    else (
        100.0 * (
            select count(*)
            from unnest({{ history }}.history_values) as history_value
            where history_value < {{ history }}.iv_value
        ) / {{ history }}.history_count
    )::double precision
end
{%- endmacro %}
