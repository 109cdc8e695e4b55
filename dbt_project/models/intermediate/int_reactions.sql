-- Signals and outcomes that reach the marts: those of a kept interaction, not stamped before it was
-- served (a reaction cannot precede what it reacts to). Reactions to dropped or unknown
-- interactions stop here. Partitioned by the interaction's (day, domain), whatever day a reaction
-- landed on: a run reads the reactions from its first day on (none can come before).

with

kept as (

    select domain, event_date, interaction_id, served_at
    from {{ ref('int_interactions_flagged') }}
    where drop_reason is null and {{ in_partitions_to_build() }}

),

signals as (

    select
        signal_event_id as reaction_event_id,
        domain,
        interaction_id,
        item_id,
        signal_type,
        {{ dbt.cast('null', dbt.type_string()) }} as outcome_name,
        value,
        text,
        signalled_at as reacted_at,
        {{ dbt.cast('null', dbt.type_string()) }} as review_selection

    from {{ ref('stg_signals') }}
    where {{ in_domain_to_build(since='first_day') }}

),

outcomes as (

    select
        outcome_event_id as reaction_event_id,
        domain,
        interaction_id,
        item_id,
        {{ dbt.cast('null', dbt.type_string()) }} as signal_type,
        outcome_name,
        outcome_value as value,
        {{ dbt.cast('null', dbt.type_string()) }} as text,
        outcome_at as reacted_at,
        review_selection

    from {{ ref('stg_outcomes') }}
    where {{ in_domain_to_build(since='first_day') }}

),

reactions as (

    select * from signals
    union all
    select * from outcomes

)

select
    reactions.*,
    kept.event_date,
    {{ seconds_between('kept.served_at', 'reactions.reacted_at') }} as after_s

from reactions
inner join kept using (domain, interaction_id)
where reactions.reacted_at >= kept.served_at
