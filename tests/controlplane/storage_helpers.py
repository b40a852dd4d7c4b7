"""Builders shared by the storage API and isolation tests."""

from __future__ import annotations

import hashlib
import io
import tarfile
from typing import Any

from rest_framework.test import APIClient

from controlplane.core.secrets import digest, new_secret
from controlplane.fleet import services as fleet
from controlplane.inventory.models import Node
from controlplane.storage import services as storage
from controlplane.storage.models import Artifact, Pool
from tests.controlplane.conftest import make_node

MIB = 1 << 20
MODEL_FILES = {"model.onnx": b"\x08\x07" * 5000, "config.json": b"{}", "tokenizer.json": b"{}"}


def archive_bytes(files: dict[str, bytes] = MODEL_FILES) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def upload(
    client: APIClient, tenant: Any, name: str = "tiny", data: bytes | None = None, **fields: str
) -> Any:
    """POST an archive the way clients do: multipart/form-data."""
    file = io.BytesIO(archive_bytes() if data is None else data)
    file.name = f"{name}.tar"
    return client.post(
        "/api/v1/artifacts/",
        {"tenant": str(tenant.pk), "name": name, "file": file, **fields},
        format="multipart",
    )


def ready_node(hostname: str, tenant: Any = None) -> Node:
    node = make_node(hostname, tenant)
    Node.objects.filter(pk=node.pk).update(status="ready")
    node.refresh_from_db()
    return node


def make_pool(node: Node, capacity: int = 100 * MIB, name: str = "models", **fields: Any) -> Pool:
    return storage.create_pool(node=node, name=name, capacity_bytes=capacity, **fields)


def make_artifact(tenant: Any, name: str = "tiny") -> Artifact:
    """An artifact row without a file, for tests that never download it."""
    return Artifact.objects.create(
        tenant=tenant,
        name=name,
        sha256="a" * 64,
        size_bytes=3 * MIB,
        unpacked_bytes=3 * MIB,
        files=[],
    )


def deployed_artifact(tenant: Any, node: Node, data: bytes) -> Artifact:
    """An artifact holding `data` on disk, used by a deployment whose volume lands on
    `node` (given a pool): its agent may download it."""
    make_pool(node)
    artifact = Artifact.objects.create(
        tenant=tenant,
        name="tiny",
        size_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        unpacked_bytes=1,
    )
    artifact.path.parent.mkdir(parents=True, exist_ok=True)
    artifact.path.write_bytes(data)
    fleet.create_deployment(
        tenant=tenant, name="chat", model_name="chat", artifact=artifact, model_volume_bytes=MIB
    )
    return artifact


def node_credential(node: Node) -> str:
    """A fresh credential of `node`, as its agent holds one."""
    secret = new_secret("tgn_")
    Node.objects.filter(pk=node.pk).update(credential_digest=digest(secret))
    return secret


def as_node(node: Node) -> APIClient:
    """An API client holding a fresh credential of `node`, as its agent would."""
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Node {node_credential(node)}")
    return client
