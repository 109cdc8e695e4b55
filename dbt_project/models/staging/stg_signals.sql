-- A signal's text (an edit, a reformulation) reaches staging only when every delivery of the
-- interaction it reacts to granted consent.

with

source as (

    select * from {{ source('raw', 'signals') }}

),

consented as (

    select domain, interaction_id, bool_and(consent = 'granted') as granted
    from {{ source('raw', 'interactions') }}
    group by domain, interaction_id

),

renamed as (

    select
        source.event_id as signal_event_id,
        source.domain,
        source.event_date,
        source.interaction_id,
        source.item_id,
        source.event_ts as signalled_at,
        source.signal_type,
        source.value,
        case when consented.granted then source.text end as text

    from source
    left join consented using (domain, interaction_id)

)

select * from renamed
