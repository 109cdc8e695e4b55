"""The Dagster wiring: thin assets, checks, jobs, schedules and sensors around the plain stages.

    partitions.py   day x domain partitions and run scopes
    resources.py    the warehouse (DuckDB) and MLflow resources
    transform.py    the dbt project as assets (quality filtering)
    assets.py       accumulation, labels, and each domain's fine-tune -> validate -> register chain
    review.py       the review queue: impressions for people to judge, exported for their review tool
    checks.py       Great Expectations suites as blocking asset checks
    jobs.py         each domain's cycle job; approve / deploy / rollback jobs
    schedules.py    one schedule per domain, on its cadence
    sensors.py      approvals deploy; late outcomes backfill their labels

The stage modules (``flywheel_pipeline.accumulation``, ``labeling``, ``training``...) never import
Dagster; ``flywheel_pipeline.definitions`` puts these pieces into the one Definitions object.
"""
