"""What inventory tells the apps built on it about nodes."""

from django.dispatch import Signal

nodes_changed = Signal()
"""Nodes were lost, drained, came back, or got new labels or a new dedication, so what may
run on them changed; `node_ids`, `why`. Sent after commit."""

node_capacity_changed = Signal()
"""A node became ready or its GPUs changed, so work waiting for room may fit now; `node`,
`cause`. Sent after the reporting service's transaction committed."""
