{#-
  SQL that DuckDB and Spark spell differently, one macro per concern. Each dispatches on the target's
  adapter (`adapter.dispatch(name, 'flywheel')`): `default__` is the DuckDB SQL the models always had
  (the `local` target compiles exactly as before), `spark__` its Spark equivalent (the `spark`
  target, docs/warehouse.md: On Spark). Casts use dbt's own cross-database macros (dbt.cast,
  dbt.type_string) directly in the models.
-#}


{#- Every column of ``relation`` but ``excluded`` (a list of names), for a select list. -#}
{% macro all_columns_except(relation, excluded) -%}
    {{ return(adapter.dispatch('all_columns_except', 'flywheel')(relation, excluded)) }}
{%- endmacro %}

{% macro default__all_columns_except(relation, excluded) -%}
    * exclude ({{ excluded | join(', ') }})
{%- endmacro %}

{#- Spark has no `* exclude`: the columns are listed (known once the relation exists; `*` at parse time). -#}
{% macro spark__all_columns_except(relation, excluded) -%}
    {%- if not execute -%}
        *
    {%- else -%}
        {%- set names = adapter.get_columns_in_relation(relation) | map(attribute='name') -%}
        {{ names | reject('in', excluded) | join(', ') }}
    {%- endif -%}
{%- endmacro %}


{#- The text of the top-level JSON entry ``key`` of ``json`` (a JSON column), null when absent. -#}
{% macro json_entry_text(json, key) -%}
    {{ return(adapter.dispatch('json_entry_text', 'flywheel')(json, key)) }}
{%- endmacro %}

{% macro default__json_entry_text(json, key) -%}
    {{ json }} ->> '{{ key }}'
{%- endmacro %}

{% macro spark__json_entry_text(json, key) -%}
    get_json_object({{ json }}, '$.{{ key }}')
{%- endmacro %}


{#- The JSON object under the top-level entry ``key`` of ``json`` as JSON text, '{}' when it is absent
    or not an object. Both engines write it compact, but may spell a number differently (0.00001, 1.0E-5). -#}
{% macro json_object_text(json, key) -%}
    {{ return(adapter.dispatch('json_object_text', 'flywheel')(json, key)) }}
{%- endmacro %}

{% macro default__json_object_text(json, key) -%}
    case when json_type({{ json }}, '$.{{ key }}') = 'OBJECT'
        then ({{ json }} -> '$.{{ key }}')::varchar else '{}' end
{%- endmacro %}

{% macro spark__json_object_text(json, key) -%}
    case when substr(get_json_object({{ json }}, '$.{{ key }}'), 1, 1) = '{'
        then get_json_object({{ json }}, '$.{{ key }}') else '{}' end
{%- endmacro %}


{#- Aggregate: the list of ``value`` over the group's rows (null values are not collected: the
    callers' are never null; a group without rows gives null on DuckDB, [] on Spark). -#}
{% macro list_of(value) -%}
    {{ return(adapter.dispatch('list_of', 'flywheel')(value)) }}
{%- endmacro %}

{% macro default__list_of(value) -%}
    list({{ value }})
{%- endmacro %}

{% macro spark__list_of(value) -%}
    collect_list({{ value }})
{%- endmacro %}


{#- The smallest element of the list ``values`` that is at least ``bound``; null when none is (or
    the list or the bound is null). -#}
{% macro smallest_at_least(values, bound) -%}
    {{ return(adapter.dispatch('smallest_at_least', 'flywheel')(values, bound)) }}
{%- endmacro %}

{% macro default__smallest_at_least(values, bound) -%}
    list_min(list_filter({{ values }}, lambda t: t >= {{ bound }}))
{%- endmacro %}

{% macro spark__smallest_at_least(values, bound) -%}
    array_min(filter({{ values }}, t -> t >= {{ bound }}))
{%- endmacro %}


{#- Aggregate: the non-null ``value`` of the row with the largest (last_by) or smallest (first_by)
    ``ordering``; rows whose value is null are skipped, as DuckDB's arg_max / arg_min skip them. -#}
{% macro last_by(value, ordering) -%}
    {{ return(adapter.dispatch('last_by', 'flywheel')(value, ordering)) }}
{%- endmacro %}

{% macro default__last_by(value, ordering) -%}
    arg_max({{ value }}, {{ ordering }})
{%- endmacro %}

{#- Spark's max_by keeps a null value and skips a null ordering: the ordering is nulled where the value is. -#}
{% macro spark__last_by(value, ordering) -%}
    max_by({{ value }}, case when ({{ value }}) is not null then {{ ordering }} end)
{%- endmacro %}

{% macro first_by(value, ordering) -%}
    {{ return(adapter.dispatch('first_by', 'flywheel')(value, ordering)) }}
{%- endmacro %}

{% macro default__first_by(value, ordering) -%}
    arg_min({{ value }}, {{ ordering }})
{%- endmacro %}

{% macro spark__first_by(value, ordering) -%}
    min_by({{ value }}, case when ({{ value }}) is not null then {{ ordering }} end)
{%- endmacro %}


{#- A struct of named fields, ``fields`` a mapping of field name -> SQL expression (in order); a
    field is read back as `<struct>.<name>` on both engines. -#}
{% macro struct_of(fields) -%}
    {{ return(adapter.dispatch('struct_of', 'flywheel')(fields)) }}
{%- endmacro %}

{% macro default__struct_of(fields) -%}
    { {%- for name, expression in fields.items() -%}
        '{{ name }}': {{ expression }}{{ ', ' if not loop.last }}
    {%- endfor -%} }
{%- endmacro %}

{% macro spark__struct_of(fields) -%}
    named_struct(
    {%- for name, expression in fields.items() -%}
        '{{ name }}', {{ expression }}{{ ', ' if not loop.last }}
    {%- endfor -%})
{%- endmacro %}


{#- The length of ``text`` in UTF-8 bytes. -#}
{% macro byte_length(text) -%}
    {{ return(adapter.dispatch('byte_length', 'flywheel')(text)) }}
{%- endmacro %}

{% macro default__byte_length(text) -%}
    strlen({{ text }})
{%- endmacro %}

{% macro spark__byte_length(text) -%}
    octet_length({{ text }})
{%- endmacro %}


{#- The Levenshtein distance between two texts counted in UTF-8 bytes, as DuckDB's levenshtein counts.
    Spark's counts characters: each text is read back byte for byte as Latin-1 (one character per byte). -#}
{% macro byte_levenshtein(left, right) -%}
    {{ return(adapter.dispatch('byte_levenshtein', 'flywheel')(left, right)) }}
{%- endmacro %}

{% macro default__byte_levenshtein(left, right) -%}
    levenshtein({{ left }}, {{ right }})
{%- endmacro %}

{% macro spark__byte_levenshtein(left, right) -%}
    levenshtein(decode(encode({{ left }}, 'UTF-8'), 'ISO-8859-1'), decode(encode({{ right }}, 'UTF-8'), 'ISO-8859-1'))
{%- endmacro %}
