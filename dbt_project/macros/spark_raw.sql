{#- Spark only: register the Parquet files of the raw tables, one folder per table under ``folder``
    (scripts/dbt_on_spark.py exports them from DuckDB), as the tables raw.<table> the sources read:
        dbt run-operation register_raw_tables --args '{folder: /abs/path}' --target spark
    A table registered before is replaced (its files are the export's, never dropped with it). -#}
{% macro register_raw_tables(folder) %}
    {%- do run_query('create database if not exists raw') -%}
    {%- for source in graph.sources.values() if source.source_name == 'raw' -%}
        {%- do run_query('drop table if exists raw.' ~ source.name) -%}
        {%- do run_query("create table raw." ~ source.name ~ " using parquet location '"
                         ~ folder ~ "/" ~ source.name ~ "'") -%}
    {%- endfor -%}
{% endmacro %}
