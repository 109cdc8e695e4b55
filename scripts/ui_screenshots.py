"""Screenshots of the Dagster UI a person looks at to approve a candidate.

Given a flywheel home with a candidate waiting for approval, start the Dagster webserver on that
home (loopback only), open the UI in headless Chromium (Debian's binary) and save:

    1-asset-graph.png             the whole lineage, raw_events -> dbt models -> labels -> models
    2-validation-report.png       <domain>/validation_report: report Markdown and headline values
    3-validation-gate-check.png   <domain>/validation_report's `gate` asset check
    4-flywheel-health.png         <domain>/flywheel_health: the verdict per trap, its series, the report
    5-flywheel-health-checks.png  its six asset checks, one per trap
    6-registered-candidate.png    <domain>/registered_candidate with its `approve` link
    7-approve-launchpad.png       the approve_candidate Launchpad that link opens, config filled in
    8-approval-run.png            with --approve: the run Launch Run started (then the daemon's
                                  approval sensor deploys the candidate; the script waits for it)

Usage: FLYWHEEL_HOME=<home> python scripts/ui_screenshots.py --out <folder> [--domain D] [--port N]
       [--approve]
"""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack
from pathlib import Path

import mlflow
from playwright.sync_api import Locator, Page, expect, sync_playwright

from flywheel_pipeline import registry
from flywheel_pipeline.config import load_config
from flywheel_pipeline.defs.ui import approval_launchpad_url
from flywheel_pipeline.home import Home
from flywheel_pipeline.launcher import (
    PROJECT_WORKSPACE,
    free_port,
    local_dagster,
    webserver,
)
from flywheel_pipeline.runs import wait_for_deployment

CHROMIUM = "/usr/bin/chromium"
# Dagster's panes scroll inside the page, so full_page shows no more: use a tall viewport.
VIEWPORT = {"width": 1600, "height": 2400}
LOAD_TIMEOUT_MS = 60_000
# Set in the browser before each page loads: skip Dagster's "Join the community" dialog and lay
# the lineage out top to bottom, which suits a tall viewport.
BROWSER_SETTINGS = """
localStorage.setItem("communityNux", "true");
localStorage.setItem("asset-graph-direction", JSON.stringify("vertical"));
"""


def open_page(page: Page, url: str, ready: Locator | str) -> None:
    """Open url and wait until the network is idle and `ready` (a locator, or text) is visible."""
    page.goto(url)
    page.wait_for_load_state("networkidle", timeout=LOAD_TIMEOUT_MS)
    locator = page.get_by_text(ready) if isinstance(ready, str) else ready
    locator.first.wait_for(timeout=LOAD_TIMEOUT_MS)


def save(page: Page, path: Path) -> Path:
    """Screenshot the viewport once the network is idle again (late queries, lazy panels)."""
    page.wait_for_load_state("networkidle", timeout=LOAD_TIMEOUT_MS)
    page.screenshot(path=path)
    return path


def metadata_key(page: Page, key: str) -> Locator:
    """The cell naming one key in an asset page's metadata table (there once it has loaded)."""
    return page.get_by_role("cell", name=key, exact=True)


def show_whole_lineage(page: Page) -> None:
    """On the lineage page: expand every group (Dagster's Alt+E), hide the group list and zoom in
    one step, so each node shows its full name and status instead of an abbreviated label."""
    page.locator("body").press("Alt+e")
    page.get_by_text("raw_events").first.wait_for(timeout=LOAD_TIMEOUT_MS)
    page.get_by_role("button", name="panel_show_right", exact=True).click()
    page.get_by_role("button", name="zoom_in", exact=True).click()
    page.get_by_text("registered_candidate").first.wait_for(timeout=LOAD_TIMEOUT_MS)


def follow_approve_link(page: Page, domain: str, version: str) -> None:
    """Click the candidate's approve link, as the README says, and wait for the Launchpad it opens."""
    page.get_by_role("link", name=f"Approve {domain} v{version}").click()
    page.wait_for_url("**/approve_candidate/playground**", timeout=LOAD_TIMEOUT_MS)
    page.wait_for_load_state("networkidle", timeout=LOAD_TIMEOUT_MS)
    page.get_by_text(f'version: "{version}"').first.wait_for(timeout=LOAD_TIMEOUT_MS)


def take_screenshots(base: str, domain: str, version: str, approve_url: str, out: Path,
                     approve: bool) -> list[Path]:
    """The screenshots, in the order a person approving a candidate reads them; with ``approve``,
    also click Launch Run in the Launchpad, as the README's walkthrough says."""
    asset = f"{base}/assets/{domain}"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM)
        try:
            context = browser.new_context(viewport=VIEWPORT)
            context.add_init_script(BROWSER_SETTINGS)
            page = context.new_page()
            shots = []
            open_page(page, f"{base}/asset-groups", f"{domain}_model")
            show_whole_lineage(page)
            shots.append(save(page, out / "1-asset-graph.png"))
            open_page(page, f"{asset}/validation_report", metadata_key(page, "report"))
            shots.append(save(page, out / "2-validation-report.png"))
            open_page(page, f"{asset}/validation_report?view=checks", "Latest execution")
            shots.append(save(page, out / "3-validation-gate-check.png"))
            open_page(page, f"{asset}/flywheel_health", metadata_key(page, "verdicts"))
            shots.append(save(page, out / "4-flywheel-health.png"))
            open_page(page, f"{asset}/flywheel_health?view=checks", "Latest execution")
            shots.append(save(page, out / "5-flywheel-health-checks.png"))
            open_page(page, f"{asset}/registered_candidate", metadata_key(page, "approve"))
            shots.append(save(page, out / "6-registered-candidate.png"))
            if approve:
                follow_approve_link(page, domain, version)
            else:
                open_page(page, approve_url, f'version: "{version}"')
            # The button stays disabled (grey) until Dagster has validated the filled-in config.
            launch = page.get_by_role("button", name="Launch Run")
            expect(launch).to_be_enabled(timeout=LOAD_TIMEOUT_MS)
            shots.append(save(page, out / "7-approve-launchpad.png"))
            if approve:
                launch.click()
                page.wait_for_url("**/runs/**", timeout=LOAD_TIMEOUT_MS)
                page.get_by_text("approve_candidate").first.wait_for(timeout=LOAD_TIMEOUT_MS)
                shots.append(save(page, out / "8-approval-run.png"))
            return shots
        finally:
            browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the screenshots")
    parser.add_argument("--domain", default="recommendation", help="the candidate's domain")
    parser.add_argument("--port", type=int, help="webserver port (default: a free one)")
    parser.add_argument("--approve", action="store_true",
                        help="click Launch Run in the Launchpad and wait for the approval sensor's deployment")
    args = parser.parse_args()

    config, home = load_config(), Home.from_env()
    client = mlflow.MlflowClient(home.mlflow_tracking_uri)
    version = registry.alias_version(client, args.domain, registry.CANDIDATE)
    if version is None:
        sys.exit(f"no {registry.CANDIDATE!r} alias on flywheel-{args.domain} in {home.root}: "
                 "nothing waits for approval")
    port = args.port or free_port()
    local = config.model_copy(update={"ui_url": f"http://127.0.0.1:{port}"})
    args.out.mkdir(parents=True, exist_ok=True)
    home.activate()
    with ExitStack() as stack:
        log = stack.enter_context((args.out / "services.log").open("w"))
        # Approving needs the daemon (its approval sensor deploys); looking needs only the UI.
        dagster = stack.enter_context(local_dagster(home, log)) if args.approve else None
        base = stack.enter_context(webserver(dagster.workspace if dagster else PROJECT_WORKSPACE, log, port))
        paths = take_screenshots(base, args.domain, version, approval_launchpad_url(local, args.domain, version),
                                 args.out, args.approve)
        if dagster:
            deploy = wait_for_deployment(dagster, config, args.domain, version, client)
            print(f"deploy_champion {deploy.status.value.lower()}: {args.domain} champion is "
                  f"v{registry.alias_version(client, args.domain, registry.CHAMPION)}")
    for path in paths:
        print(path)


if __name__ == "__main__":
    main()
