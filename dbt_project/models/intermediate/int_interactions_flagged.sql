-- Every staged interaction with the first filtering rule it breaks (drop_reason), null when kept.
-- Incremental per (day, domain) partition: a run rebuilds its partitions' interactions, reading from
-- other days only what their rules need: the earlier deliveries of their interaction_ids, their
-- users' earlier days, their sessions (int_sessions). An empty input is kept where the run's domain
-- declares its input optional (macro input_optional(): a feed has no query).

with

staged as (

    select {{ all_columns_except(ref('stg_interactions'), ['is_duplicate']) }} from {{ ref('stg_interactions') }}
    where {{ in_partitions_to_build() }}

),

deliveries as (

    -- against every delivery of their interaction_ids up to the run's last day (a later day's
    -- cannot be the first)
    {{ is_duplicate_of('staged', since='up_to_last_day') }}

),

interactions as (

    select * from staged inner join deliveries using (interaction_event_id)

),

first_days as (

    -- point in time: a user is new on the first day of any of their interactions (kept or not);
    -- a day after the run's last cannot be that day for the run's interactions
    select domain, user_id, min(event_date) as first_day
    from {{ ref('stg_interactions') }}
    where {{ in_domain_to_build(since='up_to_last_day') }}
    {%- if builds_some_partitions() %}
        and (domain, user_id) in (select domain, user_id from staged)
    {%- endif %}
    group by domain, user_id

),

sessions as (

    select domain, session_id, is_bot from {{ ref('int_sessions') }}

),

slates as (

    select
        interaction_event_id,
        count(*) as slate_size,
        max(length(item_content)) as longest_item_chars

    from {{ ref('stg_impressions') }}
    where {{ in_partitions_to_build() }}
    group by interaction_event_id

),

flagged as (

    select
        interactions.interaction_event_id,
        interactions.domain,
        interactions.event_date,
        interactions.interaction_id,
        interactions.user_id,
        interactions.session_id,
        interactions.served_at,
        interactions.policy,
        interactions.model_version,
        interactions.consent,
        interactions.segment,
        interactions.context_features,
        interactions.input_text,
        slates.slate_size,
        first_days.first_day = interactions.event_date as is_new_user,

        case
            when interactions.is_duplicate then 'duplicate_interaction'
            when interactions.consent <> 'granted' then 'consent_denied'
            when sessions.is_bot then 'bot_session'
            when length(trim(interactions.input_text)) < {{ var('min_input_chars') }}
                and not ({{ 'true' if input_optional() else 'false' }}
                         and length(trim(interactions.input_text)) = 0)
                then 'input_too_short'
            when length(trim(interactions.input_text)) > {{ var('max_input_chars') }}
                then 'input_too_long'
            when slates.longest_item_chars > {{ var('max_response_chars') }}
                then 'response_too_long'
        end as drop_reason

    from interactions
    inner join first_days using (domain, user_id)
    left join sessions using (domain, session_id)
    left join slates using (interaction_event_id)

)

select * from flagged
