{#- A later delivery of an interaction_id already seen. The rows it runs over must hold every
    earlier delivery of their interaction_ids: stg_interactions holds them all; an incremental model
    reads those of its own interactions (`is_duplicate_of`). -#}
{% macro is_later_delivery() -%}
    row_number() over (partition by domain, interaction_id order by served_at, interaction_event_id) > 1
{%- endmacro %}


{#- interaction_event_id, is_duplicate of the interactions in the CTE ``staged``, from every delivery
    of their interaction_ids in the run's domain (``since``: see in_domain_to_build). -#}
{% macro is_duplicate_of(staged, since=none) -%}
    select interaction_event_id, {{ is_later_delivery() }} as is_duplicate
    from {{ ref('stg_interactions') }}
    where {{ in_domain_to_build(since) }}
    {%- if builds_some_partitions() %}
        and (domain, interaction_id) in (select domain, interaction_id from {{ staged }})
    {%- endif %}
{%- endmacro %}
