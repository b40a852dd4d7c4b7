"""SLO definitions through the REST API: validation, OpenSLO v1 import/export, and the
thresholds the nodes serving an SLO are told to count against."""

from __future__ import annotations

from typing import Any

import yaml
from django.db import connection
from django.test.utils import CaptureQueriesContext

from controlplane.fleet.models import Revision
from controlplane.fleet.services import render_components
from controlplane.inventory.models import Node
from controlplane.slo import services
from controlplane.slo.models import Slo
from tests.controlplane.conftest import World, make_node
from tests.controlplane.test_slo_math import make_deployment, make_slo

BODY = {"name": "ttft-p99", "sli": "ttft", "threshold_seconds": 0.5, "objective": 0.99}


def test_bad_slos_are_refused_by_field(world: World, client_for: Any) -> None:
    theirs = make_deployment(world.tenant_b, "theirs")
    ours = make_deployment(world.tenant_a, "ours")
    client = client_for(world.admin_a)
    tenant = str(world.tenant_a.id)
    cases = [
        ({"sli": "availability"}, "threshold_seconds", "leave the threshold empty"),
        ({"threshold_seconds": None}, "threshold_seconds", "needs a latency threshold"),
        ({"objective": 1.0}, "objective", "less than or equal to 0.99999"),
        ({"objective": "high"}, "objective", "valid number"),
        ({"scope": "deployment"}, "deployment", "names the deployment"),
        ({"scope": "deployment", "deployment": str(theirs.pk)}, "deployment", "does not exist"),
        ({"deployment": str(ours.pk)}, "deployment", "Only scope deployment"),
        ({"scope": "model"}, "model_name", "names the model"),
        ({"sli": "storage_read", "scope": "model", "model_name": "x"}, "scope", "per node"),
        (
            {"sli": "storage_read", "threshold_seconds": 0.001, "measured_at": "gateway"},
            "measured_at",
            "node's agent",
        ),
        ({"measured_at": "client"}, "measured_at", "not a valid choice"),
        ({"window": "rolling_90d"}, "window", "not a valid choice"),
        ({"sli": "latency"}, "sli", "not a valid choice"),
        ({"burn": 1}, "burn", "Unknown field"),
    ]
    for change, field, words in cases:
        response = client.post("/api/v1/slos/", {**BODY, "tenant": tenant, **change}, format="json")
        assert response.status_code == 400, (change, response.content)
        assert words in str(response.json()[field]), (change, response.json())
    assert not Slo.objects.exists()
    created = client.post("/api/v1/slos/", {**BODY, "tenant": tenant}, format="json")
    assert created.status_code == 201, created.content
    assert created.json()["status"]["budget_remaining_ratio"] == 1.0
    again = client.post("/api/v1/slos/", {**BODY, "tenant": tenant}, format="json")
    assert again.status_code == 400
    changed = client.patch(
        f"/api/v1/slos/{created.json()['id']}/", {"tenant": str(world.tenant_b.id)}, format="json"
    )
    assert changed.status_code == 400


def test_openslo_round_trip(world: World, client_for: Any) -> None:
    chat = make_deployment(world.tenant_a, "chat")
    client = client_for(world.admin_a)
    for body in (
        {**BODY, "scope": "deployment", "deployment": str(chat.pk), "display_name": "Chat TTFT"},
        {"name": "up", "sli": "availability", "objective": 0.999, "window": "calendar_month"},
        {"name": "reads", "sli": "storage_read", "threshold_seconds": 0.002, "objective": 0.95},
        {
            **BODY,
            "name": "model",
            "scope": "model",
            "model_name": "chat-8b",
            "window": "rolling_7d",
            "measured_at": "gateway",
        },
    ):
        created = client.post(
            "/api/v1/slos/", {**body, "tenant": str(world.tenant_a.id)}, format="json"
        )
        assert created.status_code == 201, created.content
        original = created.json()
        exported = client.get(f"/api/v1/slos/{original['id']}/export/")
        assert exported.status_code == 200
        assert exported["Content-Type"] == "application/yaml"
        document = yaml.safe_load(exported.content)
        assert document["apiVersion"] == "openslo/v1" and document["kind"] == "SLO"
        assert document["spec"]["budgetingMethod"] == "Occurrences"
        assert document["spec"]["objectives"] == [
            {
                "displayName": original["display_name"] or original["name"],
                "target": body["objective"],
            }
        ]
        good = document["spec"]["indicator"]["spec"]["ratioMetric"]["good"]["metricSource"]
        assert good["type"] == "tailguard" and good["spec"]["metric"] == body["sli"]
        assert good["spec"].get("thresholdSeconds") == body.get("threshold_seconds")
        assert good["spec"].get("measuredAt", "worker") == body.get("measured_at", "worker")

        assert client.delete(f"/api/v1/slos/{original['id']}/").status_code == 204
        imported = client.post(
            f"/api/v1/slos/import/?tenant={world.tenant_a.id}",
            exported.content,
            content_type="application/yaml",
        )
        assert imported.status_code == 201, imported.content
        same = {
            k: v
            for k, v in imported.json().items()
            if k not in {"id", "created_at", "updated_at", "status"}
        }
        assert same == {
            k: v
            for k, v in original.items()
            if k not in {"id", "created_at", "updated_at", "status"}
        } | {"display_name": original["display_name"] or original["name"]}
        # importing the same name again updates it
        edited = exported.content.replace(f"target: {body['objective']}".encode(), b"target: 0.9")
        updated = client.post(
            f"/api/v1/slos/import/?tenant={world.tenant_a.id}",
            edited,
            content_type="application/yaml",
        )
        assert updated.status_code == 200, updated.content
        assert updated.json()["id"] == imported.json()["id"]
        assert updated.json()["objective"] == 0.9


def _document(**spec_changes: Any) -> dict[str, Any]:
    source = {"type": "tailguard", "spec": {"metric": "ttft", "scope": "tenant"}}
    spec = {
        "service": "chat",
        "indicator": {
            "spec": {
                "ratioMetric": {
                    "good": {
                        "metricSource": {
                            **source,
                            "spec": {**source["spec"], "thresholdSeconds": 0.5},
                        }
                    },
                    "total": {"metricSource": source},
                }
            }
        },
        "timeWindow": [{"duration": "28d", "isRolling": True}],
        "budgetingMethod": "Occurrences",
        "objectives": [{"target": 0.99}],
    }
    return {
        "apiVersion": "openslo/v1",
        "kind": "SLO",
        "metadata": {"name": "imported"},
        "spec": {**spec, **spec_changes},
    }


def test_import_errors_name_the_document_path(world: World, client_for: Any) -> None:
    client = client_for(world.admin_a)
    url = f"/api/v1/slos/import/?tenant={world.tenant_a.id}"
    good_source = "spec.indicator.spec.ratioMetric.good.metricSource"

    def post(document: Any) -> Any:
        text = document if isinstance(document, str) else yaml.safe_dump(document)
        return client.post(url, text, content_type="application/yaml")

    ok = _document()
    deployment_scoped = _document()
    deployment_scoped["spec"]["indicator"]["spec"]["ratioMetric"]["good"]["metricSource"][
        "spec"
    ].update(scope="deployment", deployment="nope")
    deployment_scoped["spec"]["indicator"]["spec"]["ratioMetric"]["total"]["metricSource"][
        "spec"
    ] = {
        "metric": "ttft",
        "scope": "deployment",
        "deployment": "nope",
    }
    prometheus = _document()
    prometheus["spec"]["indicator"]["spec"]["ratioMetric"]["good"]["metricSource"]["type"] = (
        "prometheus"
    )
    cases = [
        ("apiVersion: [unclosed", "body", "Not valid YAML"),
        ({**ok, "apiVersion": "openslo/v2"}, "apiVersion", "openslo/v1"),
        ({**ok, "kind": "SLI"}, "kind", "SLO"),
        (_document(budgetingMethod="Timeslices"), "spec.budgetingMethod", "Occurrences"),
        (_document(objectives=[{"target": 1.5}]), "spec.objectives[0].target", "0.99999"),
        (_document(objectives=[{"target": "x"}]), "spec.objectives[0].target", "valid number"),
        (_document(objectives=[]), "spec.objectives", "at least 1"),
        (
            _document(timeWindow=[{"duration": "90d", "isRolling": True}]),
            "spec.timeWindow[0]",
            "rolling",
        ),
        (_document(alertPolicies=[]), "spec.alertPolicies", "Extra inputs"),
        (prometheus, f"{good_source}.type", "tailguard"),
        (deployment_scoped, f"{good_source}.spec.deployment", "No deployment named 'nope' serves"),
        ({**ok, "metadata": {"name": "Bad Name"}}, "metadata.name", "lowercase"),
    ]
    for document, path, words in cases:
        response = post(document)
        assert response.status_code == 400, (path, response.content)
        assert words in str(response.json().get(path)), (path, response.json())
    assert not Slo.objects.exists()
    assert post(ok).status_code == 201
    # a tenant the caller does not administer is unknown
    other = client.post(
        f"/api/v1/slos/import/?tenant={world.tenant_b.id}",
        yaml.safe_dump(ok),
        content_type="application/yaml",
    )
    assert other.status_code == 400 and "tenant" in other.json()
    viewer = client_for(world.viewer_a).post(
        url, yaml.safe_dump(ok), content_type="application/yaml"
    )
    assert viewer.status_code == 400 and "tenant" in viewer.json()


def test_export_and_import_keep_tenants_apart(world: World, client_for: Any) -> None:
    theirs = make_slo(world.tenant_b, name="theirs")
    client = client_for(world.admin_a)
    assert client.get(f"/api/v1/slos/{theirs.pk}/export/").status_code == 404
    document = client_for(world.admin_b).get(f"/api/v1/slos/{theirs.pk}/export/").content
    # importing another tenant's document into one's own tenant is fine: names, not ids
    mine = client.post(
        f"/api/v1/slos/import/?tenant={world.tenant_a.id}",
        document,
        content_type="application/yaml",
    )
    assert mine.status_code == 201 and mine.json()["tenant"] == str(world.tenant_a.id)
    theirs.refresh_from_db()
    assert theirs.tenant_id == world.tenant_b.id


def test_thresholds_reach_the_nodes_running_the_deployment(world: World) -> None:
    node = make_node("gpu-a", world.tenant_a)
    Node.objects.filter(pk=node.pk).update(status="ready")
    chat = make_deployment(world.tenant_a, "chat", "chat-8b")
    other_model = make_deployment(world.tenant_a, "embed", "embed-1")
    by_deployment = make_slo(world.tenant_a, name="chat-ttft", scope="deployment", deployment=chat)
    by_model = make_slo(
        world.tenant_a,
        name="chat-model",
        scope="model",
        model_name="chat-8b",
        sli="tpot",
        threshold_seconds=0.05,
    )
    everywhere = make_slo(
        world.tenant_a, name="up", sli="availability", threshold_seconds=None, objective=0.999
    )
    make_slo(world.tenant_b, name="theirs")

    latest = Revision.objects.filter(node=node).order_by("-generation").first()
    thresholds = {
        (t["slo_id"], t["deployment_id"]): t
        for t in latest.document["state"]["components"]["slo_thresholds"]
    }
    assert set(thresholds) == {
        (str(by_deployment.pk), str(chat.pk)),
        (str(by_model.pk), str(chat.pk)),
        (str(everywhere.pk), str(chat.pk)),
        (str(everywhere.pk), str(other_model.pk)),
    }
    assert thresholds[(str(by_deployment.pk), str(chat.pk))] == {
        "slo_id": str(by_deployment.pk),
        "tenant_id": str(world.tenant_a.pk),
        "deployment_id": str(chat.pk),
        "metric": "ttft",
        "threshold_seconds": 0.5,
    }
    assert thresholds[(str(everywhere.pk), str(chat.pk))]["threshold_seconds"] is None

    services.update_slo(by_model, threshold_seconds=0.08)
    services.delete_slo(everywhere)
    latest = Revision.objects.filter(node=node).order_by("-generation").first()
    assert {
        (t["slo_id"], t["threshold_seconds"])
        for t in latest.document["state"]["components"]["slo_thresholds"]
    } == {(str(by_deployment.pk), 0.5), (str(by_model.pk), 0.08)}

    # Measured at the gateway from now on: a new revision of the SLO, and the nodes are told.
    services.update_slo(by_deployment, measured_at="gateway")
    assert by_deployment.revision == 2
    latest = Revision.objects.filter(node=node).order_by("-generation").first()
    assert {
        (t["slo_id"], t.get("measured_at", "worker"))
        for t in latest.document["state"]["components"]["slo_thresholds"]
    } == {(str(by_deployment.pk), "gateway"), (str(by_model.pk), "worker")}


def test_rendering_thresholds_costs_the_same_queries_for_any_number_of_nodes(world: World) -> None:
    nodes = []
    for i in range(4):
        node = make_node(f"n{i}", world.tenant_a if i % 2 else world.tenant_b)
        Node.objects.filter(pk=node.pk).update(status="ready")
        nodes.append(node)
    make_deployment(world.tenant_a, "a", "m")
    make_deployment(world.tenant_b, "b", "m")
    make_slo(world.tenant_a, name="a")
    make_slo(world.tenant_b, name="b")
    make_slo(world.tenant_b, name="reads", sli="storage_read", threshold_seconds=0.001)
    with CaptureQueriesContext(connection) as one:
        render_components(nodes[:1])
    with CaptureQueriesContext(connection) as all_of_them:
        rendered = render_components(nodes)
    assert len(one.captured_queries) == len(all_of_them.captured_queries)
    # each tenant's latency SLO per deployment; its storage-read SLO per node, no deployment
    assert sorted(
        (t.metric, t.deployment_id is None) for c in rendered.values() for t in c.slo_thresholds
    ) == [("storage_read", True), ("ttft", False), ("ttft", False)]
