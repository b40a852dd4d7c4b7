"""What storage tells the apps built on it."""

from django.dispatch import Signal

storage_changed = Signal()
"""Pools, volumes, QoS policies or exports changed what `nodes` must run; `cause`, `nodes`.
Sent inside the changing service's transaction, which also holds the planning lock where
it placed something."""
