{{ config(meta={'dagster': {'ref': {'name': 'rpt_quality_filter'}}}) }}
-- Kept + dropped = staged interactions, and kept = fct_interactions, per domain and day (of the
-- run's partitions: each day is reconciled when it is built).

with

reported as (

    select
        domain,
        event_date,
        sum(interactions) as reported,
        sum(interactions) filter (where rule = 'kept') as kept

    from {{ ref('rpt_quality_filter') }}
    where {{ in_run_partitions() }}
    group by domain, event_date

),

staged as (

    select domain, event_date, count(*) as staged
    from {{ ref('stg_interactions') }}
    where {{ in_run_partitions() }}
    group by domain, event_date

),

facts as (

    select domain, event_date, count(*) as facts
    from {{ ref('fct_interactions') }}
    where {{ in_run_partitions() }}
    group by domain, event_date

)

select *
from staged
full outer join reported using (domain, event_date)
full outer join facts using (domain, event_date)
where staged is distinct from reported
    or coalesce(kept, 0) <> coalesce(facts, 0)
