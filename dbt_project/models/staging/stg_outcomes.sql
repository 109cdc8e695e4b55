-- Delayed outcomes and human reviews alike: a reviewer's label event is the outcome human_review
-- (1 good / 0 bad) of the impression it judged, with how that impression was chosen for review
-- (review_selection: audit, at random, when the event does not say; or uncertainty).

with

outcomes as (

    select
        event_id as outcome_event_id,
        domain,
        event_date,
        interaction_id,
        item_id,
        event_ts as outcome_at,
        name as outcome_name,
        value as outcome_value,
        {{ dbt.cast('null', dbt.type_string()) }} as review_selection

    from {{ source('raw', 'outcomes') }}

),

reviews as (

    select
        event_id as outcome_event_id,
        domain,
        event_date,
        interaction_id,
        item_id,
        event_ts as outcome_at,
        'human_review' as outcome_name,
        case verdict when 'good' then 1.0 else 0.0 end as outcome_value,
        coalesce(selection, 'audit') as review_selection

    from {{ source('raw', 'labels') }}

)

select * from outcomes
union all
select * from reviews
