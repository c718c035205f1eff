{#- A number as published: rounded to 6 decimals, trailing zeros dropped (61.25, not 61.250000). -#}
{% macro round6(expression) -%}
trim_scale(round(({{ expression }})::numeric, 6))
{%- endmacro %}

{#- A timestamptz as Python's datetime.isoformat() writes it in UTC:
    2025-12-19T23:59:59.999999+00:00, without the fraction when it is zero. -#}
{% macro isoformat_utc(expression) -%}
to_char(({{ expression }}) at time zone 'utc', 'YYYY-MM-DD"T"HH24:MI:SS')
|| case
    when extract(microseconds from ({{ expression }}) at time zone 'utc') % 1000000 <> 0
        then to_char(({{ expression }}) at time zone 'utc', '.US')
    else ''
end
|| '+00:00'
{%- endmacro %}
