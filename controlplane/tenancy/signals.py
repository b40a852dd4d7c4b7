"""What tenancy tells the apps built on it. Each is sent inside the changing service's
transaction, so a receiver's writes commit (or roll back) with the change."""

from django.dispatch import Signal

inference_keys_changed = Signal()
"""The tenant's working inference keys changed (issued, revoked, tenant suspended or
resumed); `tenant_id`, `cause`. Workers match keys themselves."""

policy_changed = Signal()
"""The tenant's policy changed or was removed; `tenant`, `cause`. Workers enforce it and
storage engines cap the tenant's volumes by it."""

quota_changed = Signal()
"""The tenant's quotas (`max_gpus`, `max_replicas`) changed; `tenant`."""
