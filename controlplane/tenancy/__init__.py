"""Tenants, memberships and roles, API tokens and inference API keys."""
