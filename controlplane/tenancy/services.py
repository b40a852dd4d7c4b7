"""All mutations of tenancy objects; views, commands and the demo share these."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone

from controlplane.core import services as core
from controlplane.core.choices import Role
from controlplane.core.secrets import Issued, digest, new_secret
from controlplane.tenancy import signals
from controlplane.tenancy.models import (
    POLICY_FIELDS,
    QUOTA_FIELDS,
    ApiToken,
    InferenceKey,
    Membership,
    Tenant,
    TenantPolicy,
)

API_TOKEN_PREFIX = "tg_"
INFERENCE_KEY_PREFIX = "tgi_"


def create_tenant(*, slug: str, name: str, description: str = "", is_active: bool = True) -> Tenant:
    return core.create(Tenant, slug=slug, name=name, description=description, is_active=is_active)


def set_membership(*, tenant: Tenant, user: Any, role: str) -> Membership:
    membership, _ = Membership.objects.update_or_create(
        tenant=tenant, user=user, defaults={"role": role}
    )
    return membership


def issue_api_token(*, user: Any, name: str, expires_at: datetime | None = None) -> Issued:
    secret = new_secret(API_TOKEN_PREFIX)
    token = ApiToken.objects.create(
        user=user, name=name, prefix=secret[:10], digest=digest(secret), expires_at=expires_at
    )
    return Issued(token, secret)


def _keys_changed(tenant_id: Any, cause: str = "inference keys changed") -> None:
    signals.inference_keys_changed.send(sender=Tenant, tenant_id=tenant_id, cause=cause)


@transaction.atomic
def set_tenant_active(tenant: Tenant, active: bool) -> Tenant:
    """Suspend or resume a tenant. A suspended tenant's inference keys stop working on
    every worker serving it and nothing new may be created for it; its members still read
    what it has, so its history and reports stay at hand."""
    if tenant.is_active != active:
        core.update(tenant, is_active=active)
        _keys_changed(tenant.pk, f"tenant {tenant.slug} {'resumed' if active else 'suspended'}")
    return tenant


@transaction.atomic
def set_tenant_quota(tenant: Tenant, **quota: int | None) -> Tenant:
    """Change a tenant's caps (`max_gpus`, `max_replicas`; None is unlimited); the fleet
    re-plans: lowering one unplaces the surplus, raising one places what waited."""
    unknown = set(quota) - set(QUOTA_FIELDS)
    assert not unknown, f"set_tenant_quota() changes only quota fields, not {sorted(unknown)}"
    core.update(tenant, **quota)
    signals.quota_changed.send(sender=Tenant, tenant=tenant)
    return tenant


@transaction.atomic
def issue_inference_key(*, tenant: Tenant, name: str, created_by: Any = None) -> Issued:
    secret = new_secret(INFERENCE_KEY_PREFIX)
    key = InferenceKey.objects.create(
        tenant=tenant, name=name, prefix=secret[:11], digest=digest(secret), created_by=created_by
    )
    _keys_changed(tenant.pk)
    return Issued(key, secret)


@transaction.atomic
def revoke(obj: ApiToken | InferenceKey) -> None:
    if obj.revoked_at is None:
        obj.revoked_at = timezone.now()
        obj.save(update_fields=["revoked_at", "updated_at"])
        if isinstance(obj, InferenceKey):
            _keys_changed(obj.tenant_id)


def _policy_changed(tenant: Tenant, what: str) -> None:
    signals.policy_changed.send(
        sender=Tenant, tenant=tenant, cause=f"policy of tenant {tenant.slug} {what}"
    )


@transaction.atomic
def set_tenant_policy(tenant: Tenant, **fields: Any) -> TenantPolicy:
    """Create or change the tenant's policy; fields left out keep their current value."""
    unknown = set(fields) - set(POLICY_FIELDS)
    assert not unknown, f"set_tenant_policy() changes only policy fields, not {sorted(unknown)}"
    Tenant.objects.select_for_update().filter(pk=tenant.pk).first()  # one writer per tenant
    policy = TenantPolicy.objects.filter(tenant=tenant).first() or TenantPolicy(tenant=tenant)
    core.update(policy, **fields)
    _policy_changed(tenant, "changed")
    return policy


@transaction.atomic
def remove_tenant_policy(tenant: Tenant) -> None:
    """Back to the defaults (nothing limited); a tenant without a policy is left alone."""
    deleted, _ = TenantPolicy.objects.filter(tenant=tenant).delete()
    if deleted:
        _policy_changed(tenant, "removed")


@dataclass(frozen=True)
class DemoAccounts:
    tenant: Tenant
    operator: tuple[str, str]
    tenant_admin: tuple[str, str]
    api_token: str


@transaction.atomic
def seed_demo() -> DemoAccounts:
    """Idempotently create the demo tenant and users, with fresh passwords each run."""
    user_model = get_user_model()
    tenant = Tenant.objects.filter(slug="acme").first() or create_tenant(
        slug="acme", name="Acme Research", description="Demo tenant"
    )

    def account(username: str, *, superuser: bool) -> tuple[Any, str]:
        user, _ = user_model.objects.get_or_create(username=username)
        password = secrets.token_urlsafe(12)
        user.set_password(password)
        user.is_staff = superuser
        user.is_superuser = superuser
        user.save()
        return user, password

    operator, operator_password = account("operator", superuser=True)
    admin, admin_password = account("acme-admin", superuser=False)
    set_membership(tenant=tenant, user=admin, role=Role.ADMIN)
    ApiToken.objects.filter(user=admin, name="demo").delete()
    token = issue_api_token(user=admin, name="demo")
    return DemoAccounts(
        tenant=tenant,
        operator=(operator.username, operator_password),
        tenant_admin=(admin.username, admin_password),
        api_token=token.secret,
    )
