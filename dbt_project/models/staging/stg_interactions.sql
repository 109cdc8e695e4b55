-- A consent-denied interaction keeps its ids (quality filtering counts it) but not its text: its input
-- and every entry of its serving context (segment, features) stay in the raw layer.

with

source as (

    select * from {{ source('raw', 'interactions') }}

),

renamed as (

    select
        ---------- ids
        event_id as interaction_event_id,
        interaction_id,
        user_id,
        session_id,

        ---------- serving
        domain,
        event_date,
        event_ts as served_at,
        model_version,
        policy,
        consent,
        case when consent = 'granted' then input_text end as input_text,
        case when consent = 'granted' then {{ json_entry_text('context', 'segment') }} end as segment,
        -- numeric serving-time features, name -> number (the contract checks them); {} without any
        case when consent = 'granted' then {{ json_object_text('context', 'features') }} else '{}' end
            as context_features

    from source

)

---------- delivery: a later delivery of an interaction_id already seen is a duplicate
select *, {{ is_later_delivery() }} as is_duplicate
from renamed
