"""Choices the control plane's permissions rest on, so scoping can ask about them."""

from django.db import models


class Role(models.TextChoices):
    """A member's role in a tenant: admins change its objects, viewers read them."""

    ADMIN = "admin", "Tenant admin"
    VIEWER = "viewer", "Tenant viewer"
