with

source as (

    select * from {{ source('raw', 'impressions') }}

),

renamed as (

    select
        event_id as interaction_event_id,
        domain,
        interaction_id,
        item_id,
        position,
        propensity,
        content as item_content

    from source

)

select * from renamed
