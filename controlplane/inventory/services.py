"""Mutations of nodes made by people; agents' reports come through here too."""

from __future__ import annotations

from typing import Any

from controlplane.inventory.models import Node

OPERATOR_FIELDS = frozenset({"labels", "maintenance", "maintenance_reason", "tenant"})


def update_node(node: Node, **changes: Any) -> Node:
    """Apply operator edits; leaving maintenance clears its reason."""
    unknown = set(changes) - OPERATOR_FIELDS
    assert not unknown, f"update_node() changes only operator fields, not {sorted(unknown)}"
    for field, value in changes.items():
        setattr(node, field, value)
    if not node.maintenance:
        node.maintenance_reason = ""
    node.full_clean()
    node.save()
    return node
