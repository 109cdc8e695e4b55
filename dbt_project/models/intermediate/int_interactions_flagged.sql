-- Every staged interaction with the first filtering rule it breaks (drop_reason), null when kept.

with

interactions as (

    select * from {{ ref('stg_interactions') }}

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
        interactions.input_text,
        slates.slate_size,

        -- point in time: any interaction on an earlier day came before this one
        min(interactions.event_date) over (
            partition by interactions.domain, interactions.user_id
        ) = interactions.event_date as is_new_user,

        case
            when interactions.is_duplicate then 'duplicate_interaction'
            when interactions.consent <> 'granted' then 'consent_denied'
            when sessions.is_bot then 'bot_session'
            when length(trim(interactions.input_text)) < {{ var('min_input_chars') }}
                then 'input_too_short'
            when length(trim(interactions.input_text)) > {{ var('max_input_chars') }}
                then 'input_too_long'
            when slates.longest_item_chars > {{ var('max_response_chars') }}
                then 'response_too_long'
        end as drop_reason

    from interactions
    left join sessions using (domain, session_id)
    left join slates using (interaction_event_id)

)

select * from flagged
