with

source as (

    select * from {{ source('raw', 'outcomes') }}

),

renamed as (

    select
        event_id as outcome_event_id,
        domain,
        interaction_id,
        item_id,
        event_ts as outcome_at,
        name as outcome_name,
        value as outcome_value

    from source

)

select * from renamed
