{#-
  The (day, domain) partitions a run builds: the domain whose warehouse dbt opens (FLYWHEEL_DOMAIN,
  which profiles.yml reads) and the days in FLYWHEEL_DBT_DAYS, which Dagster sets (defs/transform.py):
      FLYWHEEL_DOMAIN=assistant FLYWHEEL_DBT_DAYS=2026-11-02,2026-11-03 dbt build
  Without FLYWHEEL_DBT_DAYS (a plain `dbt build`) a run builds every partition.

  The days are read only when dbt runs (`execute`), never while it parses: what it parsed (refs,
  configs) does not depend on them, so a run for other days reuses the project as parsed before
  (dbt's partial parsing). The vars flywheel_domain and flywheel_days, when given, win (a target
  whose profile names no domain):
      dbt build --vars '{"flywheel_domain": "assistant", "flywheel_days": ["2026-11-02"]}'
  but every new --vars makes dbt parse every file again.

  Predicates for the models: `in_partitions_to_build()` (the run's partitions), `in_domain_to_build()`
  (the run's domain, on any day or from a day on). Each is `true` when the model builds every
  partition: no days, or --full-refresh.
-#}

{#- The run's domain and its days (sorted 'YYYY-MM-DD'), checked; (none, []) without days. -#}
{% macro run_scope() -%}
    {%- set domain, days = var('flywheel_domain', none), var('flywheel_days', none) -%}
    {%- if domain is none and execute and env_var('FLYWHEEL_DBT_DAYS', '') -%}
        {%- set domain, days = env_var('FLYWHEEL_DOMAIN'), env_var('FLYWHEEL_DBT_DAYS').split(',') -%}
    {%- endif -%}
    {%- if domain is none -%}
        {{ return((none, [])) }}
    {%- endif -%}
    {%- set days = (days or []) | map('string') | map('trim') | sort -%}
    {%- set bad_days = [] -%}
    {%- for day in days if not modules.re.fullmatch('[0-9]{4}-[0-9]{2}-[0-9]{2}', day) -%}
        {%- do bad_days.append(day) -%}
    {%- endfor -%}
    {%- if not modules.re.fullmatch('[a-z][a-z0-9_]*', domain) or not days or bad_days -%}
        {{ exceptions.raise_compiler_error(
            "the domain must be a domain name and the days a non-empty list of YYYY-MM-DD days "
            ~ "(FLYWHEEL_DOMAIN and FLYWHEEL_DBT_DAYS, comma-separated, or the vars flywheel_domain "
            ~ "and flywheel_days), got " ~ domain ~ " and " ~ days) }}
    {%- endif -%}
    {{ return((domain, days)) }}
{%- endmacro %}


{#- Whether the domain's input may be empty (its flywheel.yaml `input`: a feed has no query), from
    FLYWHEEL_DBT_INPUT_OPTIONAL, which Dagster sets, or the var flywheel_input_optional; false
    without either. -#}
{% macro input_optional() -%}
    {%- set given = var('flywheel_input_optional', none) -%}
    {%- if given is not none -%}
        {{ return(given) }}
    {%- endif -%}
    {{ return(execute and env_var('FLYWHEEL_DBT_INPUT_OPTIONAL', 'false') == 'true') }}
{%- endmacro %}


{#- The rows of the run's partitions (columns `domain` and `event_date` of ``relation``, a table
    alias, when given); `true` without days. What tests and the incremental strategy read. A range
    (what a run covers) is a `between`, which DuckDB prunes by row group; other days a list too. -#}
{% macro in_run_partitions(relation=none) -%}
    {%- set domain, days = run_scope() -%}
    {%- set column = (relation ~ '.') if relation else '' -%}
    {%- if domain is none -%}
        true
    {%- else -%}
        {%- set first, last = modules.datetime.date.fromisoformat(days[0]), modules.datetime.date.fromisoformat(days[-1]) -%}
        ({{ column }}domain = '{{ domain }}'
         and {{ column }}event_date between date '{{ days[0] }}' and date '{{ days[-1] }}'
        {%- if (last - first).days + 1 != days | unique | list | length %}
         and {{ column }}event_date in ({% for day in days %}date '{{ day }}'{{ ', ' if not loop.last }}{% endfor %})
        {%- endif -%})
    {%- endif -%}
{%- endmacro %}


{#- Whether this model builds only the run's partitions: days given and no --full-refresh. A first
    build with days creates the table with the run's partitions only, as Dagster sees it: the other
    partitions are not materialized until a run covers them. -#}
{% macro builds_some_partitions() -%}
    {{ return(run_scope()[0] is not none and not should_full_refresh()) }}
{%- endmacro %}


{% macro in_partitions_to_build(relation=none) -%}
    {{ in_run_partitions(relation) if builds_some_partitions() else 'true' }}
{%- endmacro %}


{#- The rows of the run's domain; with ``since`` 'first_day' only from the run's first day on (what
    reacts to its interactions), with 'up_to_last_day' only up to its last (what came before them). -#}
{% macro in_domain_to_build(since=none) -%}
    {%- set domain, days = run_scope() -%}
    {%- if not builds_some_partitions() -%}
        true
    {%- else -%}
        (domain = '{{ domain }}'
        {%- if since == 'first_day' %} and event_date >= date '{{ days[0] }}'
        {%- elif since == 'up_to_last_day' %} and event_date <= date '{{ days[-1] }}'
        {%- endif -%})
    {%- endif -%}
{%- endmacro %}


{#- Incremental strategy `replace_partitions`: delete the rows of the run's partitions, insert the
    freshly built ones (a partition whose rows are gone ends empty, never stale). -#}
{% macro get_incremental_replace_partitions_sql(arg_dict) -%}
    {%- set columns = get_quoted_csv(arg_dict['dest_columns'] | map(attribute='name')) -%}
    delete from {{ arg_dict['target_relation'] }} where {{ in_run_partitions() }};
    insert into {{ arg_dict['target_relation'] }} ({{ columns }})
    select {{ columns }} from {{ arg_dict['temp_relation'] }}
{%- endmacro %}


{#- A test whose `where` is "__run_partitions__" (dbt_project.yml sets it for every test) reads only
    the run's partitions: what it checks holds per partition, and the others were checked when they
    were built. "__run_domain__" (a model without days: int_sessions) reads the run's domain. -#}
{% macro get_where_subquery(relation) -%}
    {%- set domain, days = run_scope() -%}
    {%- set where = config.get('where') -%}
    {%- if where -%}
        {%- set where = where | replace("__run_partitions__", in_run_partitions())
                              | replace("__run_domain__", "domain = '" ~ domain ~ "'" if domain else "true") -%}
        {{ return("(select * from " ~ relation ~ " where " ~ where ~ ") dbt_subquery") }}
    {%- else -%}
        {{ return(relation) }}
    {%- endif -%}
{%- endmacro %}

