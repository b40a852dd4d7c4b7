"""What SLOs tell the apps built on them."""

from django.dispatch import Signal

alert_changed = Signal()
"""An SLO alert fires (`firing` True) or resolves (False); `tenant`, `labels`,
`annotations`, `severity`, `firing`, `now`. Sent inside the evaluating (or deleting, or
revising) transaction for every alert firing as of this evaluation, with its latest
annotations, and once when it resolves; the receiver keeps it idempotent."""
