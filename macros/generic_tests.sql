{#- Generic data tests (the dbt hub is out of reach, so no dbt_utils / dbt_expectations). -#}

{#- Non-null values outside [min_value, max_value]; either bound may be exclusive or absent. -#}
{% test within_range(
    model, column_name, min_value=none, max_value=none,
    min_exclusive=false, max_exclusive=false
) %}
select {{ column_name }}
from {{ model }}
where
    {{ column_name }} is not null
    and (
        {% if min_value is not none -%}
            {{ column_name }} {{ '<=' if min_exclusive else '<' }} {{ min_value }}
        {%- else -%}
            false
        {%- endif %}
        or
        {% if max_value is not none -%}
            {{ column_name }} {{ '>=' if max_exclusive else '>' }} {{ max_value }}
        {%- else -%}
            false
        {%- endif %}
    )
{% endtest %}

{#- Combinations of columns that occur more than once. -#}
{% test unique_combination(model, columns) %}
select
    {{ columns | join(', ') }},
    count(*) as occurrences
from {{ model }}
group by {{ columns | join(', ') }}
having count(*) > 1
{% endtest %}
