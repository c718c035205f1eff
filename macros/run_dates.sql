{#- A date var as a SQL date literal, or a typed null when the var is not set. -#}
{% macro date_literal(value) -%}
{%- if value -%} '{{ value }}'::date {%- else -%} null::date {%- endif -%}
{%- endmacro %}

{#- Whether the volatility_metrics mart already holds this (ticker, date) computed from this
    options snapshot. Models upstream of the mart cannot ref() it (a cycle), so its relation is
    taken from the project graph; before the first build there is nothing to find. -#}
{% macro mart_has_snapshot(ticker_id, as_of_date, options_snapshot_at) -%}
{%- set mart = none -%}
{%- if execute -%}
{#- unit tests render without the graph: the mart then sits in the target schema -#}
{%- set node = graph.get('nodes', {}).values()
    | selectattr('resource_type', 'equalto', 'model')
    | selectattr('name', 'equalto', 'volatility_metrics')
    | first | default(none) -%}
{%- set mart = adapter.get_relation(
    database=node.database if node else target.database,
    schema=node.schema if node else target.schema,
    identifier=node.alias if node else 'volatility_metrics'
) -%}
{%- endif -%}
{%- if mart is not none -%}
exists (
    select 1
    from {{ mart }} as mart
    where
        mart.ticker_id = {{ ticker_id }}
        and mart.as_of_date = {{ as_of_date }}
        and mart.options_snapshot_at = {{ options_snapshot_at }}
)
{%- else -%}
false
{%- endif -%}
{%- endmacro %}
