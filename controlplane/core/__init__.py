"""Shared foundations: base models, DRF base classes, tenant scoping, permissions."""
