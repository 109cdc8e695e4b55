-- The content of an impression of a consent-denied interaction stays in the raw layer.

with

source as (

    select * from {{ source('raw', 'impressions') }}

),

interactions as (

    select event_id, domain, event_date, consent from {{ source('raw', 'interactions') }}

),

renamed as (

    select
        source.event_id as interaction_event_id,
        source.domain,
        source.event_date,
        source.interaction_id,
        source.item_id,
        source.position,
        source.propensity,
        case when interactions.consent = 'granted' then source.content end as item_content

    from source
    -- one event: the same domain and day on both sides, so a filter on them reaches both scans
    left join interactions using (event_id, domain, event_date)

)

select * from renamed
