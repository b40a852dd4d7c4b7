"""What apps built on the fleet add to it, registered at their ready(): the fleet cannot
import them. SLOs add the thresholds workers count good/total against, and refuse to let
a deployment stop serving a tenant whose SLOs still measure it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any
from uuid import UUID

from agent.protocol import SloThreshold

ThresholdSource = Callable[
    [list[Any], list[Any], Mapping[UUID, list[UUID]]], Mapping[Any, list[SloThreshold]]
]
"""(nodes, their placed replicas, tenants each deployment serves) -> thresholds per node id."""

UnshareCheck = Callable[[Any, set[UUID]], list[str]]
"""(deployment, tenant ids it would stop serving) -> why it may not, as messages."""

threshold_sources: list[ThresholdSource] = []
unshare_checks: list[UnshareCheck] = []
