from django.db import models


class Role(models.TextChoices):
    ADMIN = "admin", "Tenant admin"
    VIEWER = "viewer", "Tenant viewer"
