"""Alerts: what needs a person, said where people look.

Every alert is first a failed asset check in Dagster (the UI shows it red, and Dagster's own alert
policies can page on it). When flywheel.yaml names ``alerts.webhook_url_env``, the alert is also
POSTed as JSON to the URL that variable holds: ``{"text": ..., "domain": ..., "kind": ..., ...}``,
which Slack's and Teams' incoming webhooks accept as is (they read ``text``) and any relay to
e-mail can forward. A webhook that does not answer is logged, never fatal: the check has failed
either way.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass

from flywheel_pipeline.config import FlywheelConfig

TIMEOUT_S = 10
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Alert:
    domain: str
    kind: str  # live_regression, drift
    text: str  # one line a person can act on

    def payload(self) -> dict[str, str]:
        return {"text": f"flywheel {self.domain}: {self.text}", "domain": self.domain, "kind": self.kind}


def notify(config: FlywheelConfig, alert: Alert) -> str:
    """Send ``alert`` to the configured webhook; what happened, for the run's log and metadata."""
    variable = config.alerts.webhook_url_env
    if variable is None:
        return "no webhook configured (alerts.webhook_url_env): the failed check is the alert"
    url = os.environ.get(variable)
    if not url:
        return f"alerts.webhook_url_env names {variable}, which is not set: not sent"
    request = urllib.request.Request(url, data=json.dumps(alert.payload()).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return f"sent to ${variable} (HTTP {response.status})"
    except (urllib.error.URLError, OSError) as error:
        log.warning("alert to $%s failed: %s", variable, error)
        return f"sending to ${variable} failed: {error}"
