{#- Spark only, dbt's on-run-start (dbt_project.yml): register the tables of the distributed profile's
    object store, which $FLYWHEEL_SPARK_TABLES lists as [{"name": "raw.interactions", "location":
    "s3a://bucket/prefix/raw.db/interactions"}, ...] (flywheel_pipeline/object_store.py), in this
    run's metastore, with the partitions their folders hold, and in dbt's cache of relations. Spark infers each one's columns and
    partitioning from its Parquet files; the metastore lives only as long as the run, so runs on
    different machines (or a domain's days side by side) share nothing but the files. -#}
{% macro register_tables() %}
    {%- if execute and target.type == 'spark' -%}
        {%- for table in fromjson(env_var('FLYWHEEL_SPARK_TABLES', '[]')) -%}
            {%- do run_query('create database if not exists ' ~ table.name.split('.')[0]) -%}
            {%- do run_query("create table if not exists " ~ table.name ~ " using parquet location '"
                             ~ table.location ~ "'") -%}
            {%- do run_query('alter table ' ~ table.name ~ ' recover partitions') -%}
            {#- dbt listed the relations before this hook ran: without this an incremental model
                built by an earlier run would look new, and its `create table` would fail -#}
            {%- do adapter.cache_added(api.Relation.create(schema=table.name.split('.')[0],
                                                           identifier=table.name.split('.')[1], type='table')) -%}
        {%- endfor -%}
    {%- endif -%}
{% endmacro %}
