-- One row per kept impression: the item shown, with its signals and outcomes pivoted. A reaction
-- with an item_id applies to that impression; one without (abandon, reformulate, rating, an
-- assistant's accept) to every impression of its interaction. Partitioned by the interaction's
-- (day, domain), like int_reactions.

with

impressions as (

    select impressions.*
    from {{ ref('stg_impressions') }} as impressions
    inner join {{ ref('int_interactions_flagged') }} as interactions
        on interactions.interaction_event_id = impressions.interaction_event_id
    where interactions.drop_reason is null
        and {{ in_partitions_to_build('impressions') }} and {{ in_partitions_to_build('interactions') }}

),

reactions as (

    select * from {{ ref('int_reactions') }}
    where {{ in_partitions_to_build() }}

),

per_impression as (

    select
        impressions.domain,
        impressions.interaction_id,
        impressions.item_id,

        count(*) filter (where signal_type = 'accept') > 0 as accepted,
        min(after_s) filter (where signal_type = 'accept') as accepted_at_s,
        {{ list_of('after_s') }} filter (where signal_type = 'revert') as reverts_after_s,
        count(*) filter (where signal_type = 'reject') > 0 as rejected,
        {{ last_by('text', 'reacted_at') }} filter (where signal_type = 'edit') as edited_text,
        min(after_s) filter (where signal_type = 'reformulate') as reformulated_after_s,
        count(*) filter (where signal_type = 'copy') > 0 as copied,
        min(after_s) filter (where signal_type = 'abandon') as abandoned_after_s,
        {{ last_by('value', 'reacted_at') }} filter (where signal_type = 'rating') as rating,
        count(*) filter (where signal_type = 'click') > 0 as clicked,
        min(after_s) filter (where signal_type = 'click') as clicked_after_s,
        sum(value) filter (where signal_type = 'dwell') as dwell_s,
        {{ first_by(
            struct_of({'name': 'outcome_name', 'value': 'value', 'at': 'reacted_at', 'after_s': 'after_s'}),
            'reacted_at'
        ) }} filter (where outcome_name <> 'human_review') as first_outcome,
        {{ last_by(struct_of({'value': 'value', 'at': 'reacted_at', 'selection': 'review_selection'}), 'reacted_at') }}
            filter (where outcome_name = 'human_review') as last_review,
        {{ last_by('value', 'reacted_at') }}
            filter (where outcome_name = 'human_review' and review_selection = 'audit') as audit_review_value

    from impressions
    inner join reactions
        on reactions.domain = impressions.domain
        and reactions.interaction_id = impressions.interaction_id
        and (reactions.item_id is null or reactions.item_id = impressions.item_id)
    group by impressions.domain, impressions.interaction_id, impressions.item_id

),

deepest_clicks as (

    select impressions.domain, impressions.interaction_id, max(impressions.position) as max_clicked_position
    from impressions
    inner join per_impression using (domain, interaction_id, item_id)
    where per_impression.clicked
    group by impressions.domain, impressions.interaction_id

),

pivoted as (

    select
        impressions.interaction_event_id,
        impressions.domain,
        impressions.event_date,
        impressions.interaction_id,
        impressions.item_id,
        impressions.position,
        impressions.propensity,
        impressions.item_content,

        coalesce(per_impression.accepted, false) as accepted,
        per_impression.accepted_at_s,
        {{ smallest_at_least('per_impression.reverts_after_s', 'per_impression.accepted_at_s') }}
            - per_impression.accepted_at_s as reverted_after_accept_s,
        coalesce(per_impression.rejected, false) as rejected,
        -- the distance in UTF-8 bytes (DuckDB's levenshtein counts them) over the longer byte length
        case
            when per_impression.edited_text is null then null
            when greatest({{ byte_length('impressions.item_content') }}, {{ byte_length('per_impression.edited_text') }}) = 0
                then 0.0
            else {{ byte_levenshtein('impressions.item_content', 'per_impression.edited_text') }}
                / greatest({{ byte_length('impressions.item_content') }}, {{ byte_length('per_impression.edited_text') }})
        end as edit_ratio,
        per_impression.edited_text,
        per_impression.reformulated_after_s,
        coalesce(per_impression.copied, false) as copied,
        per_impression.abandoned_after_s,
        per_impression.rating,
        coalesce(per_impression.clicked, false) as clicked,
        per_impression.clicked_after_s,
        per_impression.dwell_s,
        deepest_clicks.max_clicked_position,
        per_impression.first_outcome.name as outcome_name,
        per_impression.first_outcome.value as outcome_value,
        per_impression.first_outcome.at as outcome_at,
        per_impression.first_outcome.after_s as outcome_delay_s,
        per_impression.last_review.value as review_value,
        per_impression.last_review.at as reviewed_at,
        per_impression.last_review.selection as review_selection,
        per_impression.audit_review_value

    from impressions
    left join per_impression using (domain, interaction_id, item_id)
    left join deepest_clicks using (domain, interaction_id)

)

select * from pivoted
