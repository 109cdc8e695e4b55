with

interactions as (

    select * from {{ ref('int_interactions_flagged') }}
    where {{ in_partitions_to_build() }}

),

impressions as (

    select * from {{ ref('int_impression_signals') }}
    where {{ in_partitions_to_build() }}

)

select
    ---------- serving time: what a model may train on
    interactions.domain,
    interactions.event_date,
    interactions.interaction_id,
    impressions.item_id,
    impressions.position,
    impressions.propensity,
    interactions.policy,
    interactions.model_version,
    interactions.served_at,
    interactions.user_id,
    interactions.session_id,
    interactions.is_new_user,
    interactions.segment,
    interactions.context_features,
    interactions.input_text,
    impressions.item_content,
    interactions.slate_size,

    ---------- reactions: known only afterwards (labeling reads them, training never does)
    impressions.accepted,
    impressions.accepted_at_s,
    impressions.reverted_after_accept_s,
    impressions.rejected,
    impressions.edit_ratio,
    impressions.edited_text,
    impressions.reformulated_after_s,
    impressions.copied,
    impressions.abandoned_after_s,
    impressions.rating,
    impressions.clicked,
    impressions.clicked_after_s,
    impressions.dwell_s,
    impressions.max_clicked_position,
    impressions.outcome_name,
    impressions.outcome_value,
    impressions.outcome_at,
    impressions.outcome_delay_s,
    impressions.review_value,
    impressions.reviewed_at,
    impressions.review_selection,
    impressions.audit_review_value

from impressions
inner join interactions using (interaction_event_id)
