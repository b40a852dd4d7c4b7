"""Read-side queries for inventory: whether a node takes new work, and why not."""

from __future__ import annotations

from controlplane.inventory.choices import NodeStatus
from controlplane.inventory.models import AgentReport, Node


def not_taking_work(node: Node) -> str | None:
    """Why `node` takes nothing new now (it is drained or its agent is silent), in words that
    say what to look at; None while it takes new work."""
    if node.maintenance:
        because = f": {node.maintenance_reason}" if node.maintenance_reason else ""
        return f"node {node.hostname} is in maintenance{because}"
    if node.status == NodeStatus.UNREACHABLE:
        report = AgentReport.objects.filter(node=node).first()
        heard = (
            f"no heartbeat since {report.last_heartbeat_at:%Y-%m-%d %H:%M:%S} UTC"
            if report and report.last_heartbeat_at
            else "never sent a heartbeat"
        )
        return f"node {node.hostname} is unreachable ({heard})"
    if node.status != NodeStatus.READY:
        return f"node {node.hostname} is {node.status}: its agent has not sent a heartbeat yet"
    return None
