-- One row per session: how many interactions, how fast, how repetitive; is_bot flags bot/spam-like ones.
-- Inputs of consent-denied interactions are null here (stg_interactions) and count as no repeat,
-- as do empty ones (a feed has no query).
-- A session is judged whole, whatever days it spans: a run rebuilds the sessions its partitions'
-- interactions belong to, with their interactions on every day. On Spark (Parquet tables: no
-- row-level delete) the table is partitioned by domain and a run rebuilds every session of its domain.

{%- set on_spark = target.type == 'spark' %}
{{ config(materialized='incremental', unique_key=['domain', 'session_id'],
          incremental_strategy='insert_overwrite' if on_spark else 'delete+insert',
          partition_by='domain' if on_spark else none) }}

with

staged as (

    select {{ all_columns_except(ref('stg_interactions'), ['is_duplicate']) }} from {{ ref('stg_interactions') }}
    where {{ in_domain_to_build() }}
    {%- if builds_some_partitions() and not on_spark %}
        and (domain, session_id) in (
            select domain, session_id from {{ ref('stg_interactions') }} where {{ in_run_partitions() }}
        )
    {%- endif %}

),

deliveries as (

    -- against every delivery of their interaction_ids, on any day
    {{ is_duplicate_of('staged') }}

),

interactions as (

    select domain, session_id, served_at, lower(trim(input_text)) as normalized_input
    from staged
    inner join deliveries using (interaction_event_id)
    where not deliveries.is_duplicate

),

gaps as (

    select
        domain,
        session_id,
        served_at,
        {{ seconds_between(
            'lag(served_at) over (partition by domain, session_id order by served_at)', 'served_at'
        ) }} as gap_s

    from interactions

),

timing as (

    select
        domain,
        session_id,
        min(served_at) as started_at,
        max(served_at) as ended_at,
        count(*) as n_interactions,
        median(gap_s) as median_gap_s

    from gaps
    group by domain, session_id

),

repeats as (

    select domain, session_id, max(n_same_input) as max_repeated_input
    from (
        -- an empty input (a feed's: no query) is no repeat
        select domain, session_id, normalized_input, count(nullif(normalized_input, '')) as n_same_input
        from interactions
        group by domain, session_id, normalized_input
    )
    group by domain, session_id

),

flagged as (

    select
        timing.*,
        repeats.max_repeated_input,
        case
            when n_interactions > {{ var('bot_max_interactions') }} then 'too_many_interactions'
            when n_interactions >= {{ var('bot_min_interactions_for_gap') }}
                and median_gap_s < {{ var('bot_min_median_gap_s') }} then 'too_fast'
            when max_repeated_input >= {{ var('bot_max_repeated_input') }} then 'repeated_input'
        end as bot_rule

    from timing
    inner join repeats using (domain, session_id)

)

select *, bot_rule is not null as is_bot
from flagged
