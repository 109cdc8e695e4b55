"""Training sets out, as Dagster assets: thin wiring around flywheel_pipeline.training_sets.

    labels -> <domain>/sft_dataset, <domain>/preference_dataset   (assistant-shaped domains)

One multi-asset per domain (one step, one MLflow run for both sets), in the domain's cycle job
beside the model chain: nothing downstream waits for it.
"""

import dagster as dg

from flywheel_pipeline import training_sets
from flywheel_pipeline.config import FlywheelConfig
from flywheel_pipeline.defs.assets import LABELS, latest_labelled_day
from flywheel_pipeline.defs.resources import WarehouseResource
from flywheel_pipeline.labeling import maturity_cutoff
from flywheel_pipeline.training import split_windows

DESCRIPTIONS = {
    training_sets.SFT: "Chat-format SFT records (messages) of responses labelled good with high confidence, "
                       "from the mature training window; Parquet + JSONL + dataset card.",
    training_sets.PREFERENCE: "DPO pairs (prompt, chosen, rejected) from edits, regenerations and "
                              "reformulations, from the mature training window; Parquet + JSONL + dataset card.",
}


def training_sets_group(domain: str) -> str:
    return f"{domain}_training_sets"


def training_set_keys(domain: str) -> dict[str, dg.AssetKey]:
    return {name: dg.AssetKey([domain, name]) for name in DESCRIPTIONS}


def build_training_set_assets(config: FlywheelConfig, domain: str) -> list[dg.AssetsDefinition]:
    """An assistant domain's training sets; none for other shapes."""
    if config.domain(domain).shape != "assistant":
        return []
    keys = training_set_keys(domain)
    specs = [dg.AssetSpec(key, deps=[LABELS], group_name=training_sets_group(domain), kinds={"parquet", "mlflow"},
                          description=DESCRIPTIONS[name]) for name, key in keys.items()]

    @dg.multi_asset(name=training_sets_group(domain), specs=specs, can_subset=True)
    def export_training_sets(context: dg.AssetExecutionContext, warehouse: WarehouseResource):
        names = [name for name, key in keys.items() if key in context.selected_asset_keys]
        with warehouse.warehouses().reader(domain) as source:
            as_of = latest_labelled_day(source, domain)
            windows = split_windows(as_of, config.domain(domain), maturity_cutoff(source, config, domain, as_of))
        with warehouse.warehouses().for_days(domain, training_sets.copy_scope(windows), read_only=True) as (con, _):
            exported = training_sets.export(con, warehouse.home(), config, domain, names, windows,
                                            context.run.run_id)
        for item in exported:
            yield dg.MaterializeResult(asset_key=keys[item.training_set.name], metadata=item.metadata())

    return [export_training_sets]
