from django.db import models


class RevisionStatus(models.TextChoices):
    PENDING = "pending", "Sent, not yet reported"
    APPLIED = "applied", "Applied"
    FAILED = "failed", "Applied with failures"
    REJECTED = "rejected", "Rejected by the agent"


class RolloutState(models.TextChoices):
    NONE = "none", "No desired state yet"
    IN_SYNC = "in_sync", "In sync"
    PENDING = "pending", "Rolling out"
    FAILED = "failed", "Failed"
    REJECTED = "rejected", "Rejected"


class PlacementStrategy(models.TextChoices):
    SPREAD = "spread", "Spread: fewest replicas of the deployment per node"
    PACK = "pack", "Pack: fill nodes that already run it, then the fullest"
