"""How alerts answer the apps they build on. Connected in `AlertsConfig.ready()`."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from controlplane.alerts import services


def slo_alert_changed(
    sender: Any,
    *,
    tenant: Any,
    labels: dict[str, str],
    annotations: dict[str, str],
    severity: str,
    firing: bool,
    now: datetime,
    **kwargs: Any,
) -> None:
    services.sync_alert(
        tenant=tenant,
        labels=labels,
        annotations=annotations,
        severity=severity,
        firing=firing,
        now=now,
    )
