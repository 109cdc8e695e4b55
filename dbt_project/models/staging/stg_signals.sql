with

source as (

    select * from {{ source('raw', 'signals') }}

),

renamed as (

    select
        event_id as signal_event_id,
        domain,
        interaction_id,
        item_id,
        event_ts as signalled_at,
        signal_type,
        value,
        text

    from source

)

select * from renamed
