"""What SLOs tell the apps built on them."""

from django.dispatch import Signal

alert_changed = Signal()
"""An SLO alert starts firing (`firing` True) or resolves (False); `tenant`, `labels`,
`annotations`, `severity`, `firing`, `now`. Sent inside the evaluating (or deleting)
transaction, only where the alert's state differs from what the last evaluation left."""
