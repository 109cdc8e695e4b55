{#- No two rows share the same values in these columns (dbt-utils' test of the same name). -#}
{% test unique_combination_of_columns(model, combination_of_columns) %}

select {{ combination_of_columns | join(', ') }}, count(*) as n_rows
from {{ model }}
group by all
having count(*) > 1

{% endtest %}
