{#- Seconds (fractional) from one timestamp to a later one. -#}
{% macro seconds_between(start_ts, end_ts) -%}
    (epoch({{ end_ts }}) - epoch({{ start_ts }}))
{%- endmacro %}
