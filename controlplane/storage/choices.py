from django.db import models


class PoolKind(models.TextChoices):
    LOCAL = "local", "Local engine (a directory)"
    SPDK = "spdk", "SPDK (an lvstore on an NVMe drive)"
