"""Control-plane fixtures: two tenants, users of every role, token-authenticated clients."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from django.conf import global_settings
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from controlplane.core.choices import Role
from controlplane.inventory.models import AgentReport, Gpu, Node
from controlplane.tenancy.services import create_tenant, issue_api_token, set_membership


@dataclass
class World:
    tenant_a: Any
    tenant_b: Any
    platform: Any
    admin_a: Any
    viewer_a: Any
    admin_b: Any


@pytest.fixture
def world(db: Any) -> World:
    users = get_user_model().objects
    tenant_a = create_tenant(slug="tenant-a", name="Tenant A")
    tenant_b = create_tenant(slug="tenant-b", name="Tenant B")
    platform = users.create_user("platform", password="x", is_superuser=True, is_staff=True)
    admin_a = users.create_user("admin-a", password="x")
    viewer_a = users.create_user("viewer-a", password="x")
    admin_b = users.create_user("admin-b", password="x")
    set_membership(tenant=tenant_a, user=admin_a, role=Role.ADMIN)
    set_membership(tenant=tenant_a, user=viewer_a, role=Role.VIEWER)
    set_membership(tenant=tenant_b, user=admin_b, role=Role.ADMIN)
    return World(tenant_a, tenant_b, platform, admin_a, viewer_a, admin_b)


@pytest.fixture
def client_for(db: Any) -> Callable[[Any], APIClient]:
    """An API client that authenticates with a freshly issued API token for `user`."""

    def make(user: Any) -> APIClient:
        client = APIClient()
        client.credentials(
            HTTP_AUTHORIZATION=f"Bearer {issue_api_token(user=user, name='t').secret}"
        )
        return client

    return make


def make_node(hostname: str, tenant: Any = None, gpus: int = 0) -> Node:
    node = Node.objects.create(hostname=hostname, tenant=tenant, cpu_count=64)
    Gpu.objects.bulk_create(
        Gpu(
            node=node,
            index=i,
            uuid=f"GPU-{hostname}-{i}",
            name="NVIDIA H100 80GB HBM3",
            memory_total_bytes=80 * 2**30,
            pci_bus_id=f"0000:{i + 16:02x}:00.0",
            numa_node=i // 4,
        )
        for i in range(gpus)
    )
    return node


def heard(node: Node, at: Any) -> None:
    """As if the node's agent last sent a heartbeat `at` (a datetime)."""
    AgentReport.objects.update_or_create(node=node, defaults={"last_heartbeat_at": at})


def give_password(user: Any, password: str, settings: Any) -> None:
    """Hash with Django's default hasher: the server processes do not use the tests' fast one."""
    settings.PASSWORD_HASHERS = global_settings.PASSWORD_HASHERS
    user.set_password(password)
    user.save()


@pytest.fixture(autouse=True)
def fast_password_hashing(settings: Any) -> None:
    """PBKDF2 is slow on purpose; tests create many users."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def http_scope(
    method: str, path: str, headers: list[tuple[bytes, bytes]] | None = None
) -> dict[str, Any]:
    """The ASGI scope of an HTTP request to the control plane, for calling its handler
    directly (to feed it messages one by one, or see what it sends)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"testserver"), *(headers or [])],
        "client": ("127.0.0.1", 5000),
        "server": ("testserver", 80),
    }
