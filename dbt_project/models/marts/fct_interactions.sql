with

interactions as (

    select * from {{ ref('int_interactions_flagged') }}
    where drop_reason is null and {{ in_partitions_to_build() }}

),

reactions as (

    select
        domain,
        interaction_id,
        count(signal_type) as n_signals,
        count(*) filter (
            where signal_type in {{ "('" ~ var('explicit_signal_types') | join("', '") ~ "')" }}
        ) > 0 as has_explicit_feedback,
        count(*) filter (where outcome_name <> 'human_review') > 0 as has_outcome

    from {{ ref('int_reactions') }}
    where {{ in_partitions_to_build() }}
    group by domain, interaction_id

)

select
    interactions.domain,
    interactions.event_date,
    interactions.interaction_id,
    interactions.user_id,
    interactions.session_id,
    interactions.served_at,
    interactions.policy,
    interactions.model_version,
    interactions.is_new_user,
    interactions.segment,
    interactions.slate_size,
    coalesce(reactions.n_signals, 0) as n_signals,
    coalesce(reactions.has_explicit_feedback, false) as has_explicit_feedback,
    coalesce(reactions.has_outcome, false) as has_outcome

from interactions
left join reactions using (domain, interaction_id)
