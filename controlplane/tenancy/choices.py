from django.db import models


class PriorityClass(models.TextChoices):
    """A tenant's class on inference workers; higher classes are admitted first."""

    LOW = "low", "Low"
    NORMAL = "normal", "Normal"
    HIGH = "high", "High"


WORKER_PRIORITY = {PriorityClass.LOW: 0, PriorityClass.NORMAL: 1, PriorityClass.HIGH: 2}
"""The integer priority inference workers order classes by."""
