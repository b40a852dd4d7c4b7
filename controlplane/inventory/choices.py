from django.db import models


class NodeStatus(models.TextChoices):
    PENDING = "pending", "Pending (never heard from)"
    READY = "ready", "Ready"
    UNREACHABLE = "unreachable", "Unreachable"


class MigMode(models.TextChoices):
    DISABLED = "disabled", "Disabled"
    ENABLED = "enabled", "Enabled"
    UNSUPPORTED = "unsupported", "Unsupported"


class LinkLayer(models.TextChoices):
    INFINIBAND = "InfiniBand", "InfiniBand"
    ETHERNET = "Ethernet", "Ethernet (RoCE)"
