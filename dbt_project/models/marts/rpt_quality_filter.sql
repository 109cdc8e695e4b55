select
    domain,
    event_date,
    coalesce(drop_reason, 'kept') as rule,
    count(*) as interactions

from {{ ref('int_interactions_flagged') }}
where {{ in_partitions_to_build() }}
group by domain, event_date, rule
