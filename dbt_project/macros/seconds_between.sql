{#- Seconds (fractional) from one timestamp to a later one: each as seconds since the epoch (a double,
    microseconds / 1e6, as DuckDB's epoch() computes it), then their difference, so both engines round alike. -#}
{% macro seconds_between(start_ts, end_ts) -%}
    {{ return(adapter.dispatch('seconds_between', 'flywheel')(start_ts, end_ts)) }}
{%- endmacro %}

{% macro default__seconds_between(start_ts, end_ts) -%}
    (epoch({{ end_ts }}) - epoch({{ start_ts }}))
{%- endmacro %}

{% macro spark__seconds_between(start_ts, end_ts) -%}
    (unix_micros({{ end_ts }}) / 1e6 - unix_micros({{ start_ts }}) / 1e6)
{%- endmacro %}
