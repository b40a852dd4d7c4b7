"""An uploaded model travels for real: upload -> deployment -> agent stages it into a volume
(sha256-verified, a corrupted download refetched) -> the worker serves it."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from controlplane.fleet.models import Replica, Revision
from controlplane.inventory.models import Node
from controlplane.inventory.services import create_bootstrap_token
from controlplane.storage.models import Pool
from dataplane.inference.synthetic import SyntheticModelSpec, write_synthetic_model
from tests.e2e.proxy import CorruptingProxy
from tests.e2e.stack import running_stack, seed_tenant, wait_for

POOL_BYTES = 256 << 20


def pack_model(tmp_path: Path) -> Path:
    """A synthetic model as the upload API takes it: a tar of the model directory's files."""
    model = tmp_path / "model"
    write_synthetic_model(
        model,
        SyntheticModelSpec(layers=1, hidden=64, heads=2, kv_heads=2, vocab=320, max_context=256),
    )
    archive = tmp_path / "tiny.tar"
    with tarfile.open(archive, "w") as tar:
        for file in sorted(model.iterdir()):
            tar.add(file, arcname=file.name)
    return archive


def _serving_revision(node: Node) -> bool:
    return any(
        r.document["state"]["components"]["workers"]
        for r in Revision.objects.filter(node=node, status="applied")
    )


@pytest.mark.e2e
def test_uploaded_model_is_staged_verified_and_served(
    transactional_db: Any, tmp_path: Path, free_port: int, django_user_model: Any
) -> None:
    tenant, api, key = seed_tenant(django_user_model, free_port)
    bootstrap = create_bootstrap_token(name="e2e").secret
    archive = pack_model(tmp_path)
    sha256 = hashlib.sha256(archive.read_bytes()).hexdigest()

    with (
        CorruptingProxy(f"http://127.0.0.1:{free_port}", corrupt=1) as proxy,
        running_stack(tmp_path, free_port, PUBLIC_URL=proxy.url) as stack,
    ):
        stack.start_agent("store-node", bootstrap, control_plane=proxy.url)
        node = wait_for(lambda: Node.objects.filter(status="ready").first(), 60, "the agent")
        response = api.post(
            "/pools/",
            json={
                "node": str(node.pk),
                "name": "models",
                "kind": "local",
                "capacity_bytes": POOL_BYTES,
            },
        )
        assert response.status_code == 201, response.text
        wait_for(
            lambda: Pool.objects.filter(reported_capacity_bytes=POOL_BYTES).exists(),
            60,
            "the agent to create the pool and report it",
        )

        response = api.post(
            "/artifacts/",
            data={"tenant": str(tenant.pk), "name": "tiny", "sha256": sha256},
            files={"file": ("tiny.tar", archive.read_bytes())},
        )
        assert response.status_code == 201, response.text
        assert (response.json()["sha256"], response.json()["size_bytes"]) == (
            sha256,
            archive.stat().st_size,
        )
        response = api.post(
            "/deployments/",
            json={
                "tenant": str(tenant.pk),
                "name": "tiny",
                "model_name": "tiny-chat",
                "artifact": response.json()["id"],
                "runtime_options": {"intra_op_threads": 1},
            },
        )
        assert response.status_code == 201, response.text
        wait_for(lambda: _serving_revision(node), 120, "the worker's revision applied")

        replica = Replica.objects.select_related("pool").get(deployment__name="tiny")
        assert replica.pool is not None and replica.pool.name == "models"
        completion = httpx.post(
            f"http://127.0.0.1:{replica.port}/v1/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": "tiny-chat", "prompt": "hello", "max_tokens": 4, "ignore_eos": True},
            timeout=60,
        )
        assert completion.status_code == 200, completion.text
        assert completion.json()["usage"]["completion_tokens"] == 4

        volume = tmp_path / "store-node" / "storage" / "pools" / "models" / replica.volume_name
        assert hashlib.sha256((volume / "model.tar").read_bytes()).hexdigest() == sha256
        assert (volume / "model.tar.sha256").read_text().strip() == sha256
        assert (volume / "model" / "model.onnx").is_file()
        # The corrupted first download failed verification and was fetched again, whole.
        assert proxy.corrupted == 1
        assert proxy.artifact_requests.count(f"bytes=0-{archive.stat().st_size - 1}") == 2
