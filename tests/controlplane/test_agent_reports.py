"""What agents report often, heartbeats and status reports, is cheap and never lost: a
repeated report is acknowledged and stored once, a replayed copy never hides the report
of the applied one, and neither waits behind planners' row locks. Enrolling a node costs
a fixed number of queries."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.db import OperationalError, connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from agent.protocol import AppliedStatus, ComponentResult, Heartbeat
from agent.simulate import synthetic_inventory
from controlplane.fleet import services as fleet
from controlplane.fleet.models import Deployment, Replica, Revision
from controlplane.inventory import services as inventory
from controlplane.inventory.models import AgentReport, Node
from controlplane.telemetry import services as telemetry
from controlplane.tenancy.models import Tenant
from tests.agent.samples import inventory as sample_inventory
from tests.controlplane.conftest import World, heard, make_node
from tests.controlplane.telemetry_helpers import batch
from tests.controlplane.test_agent_api import as_node, enroll

T0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)


def _ready_node_with_revision(world: World, hostname: str = "gpu-17") -> tuple[Node, str]:
    """An enrolled node with its GPUs, heard once, running one replica (generation 1)."""
    grant = enroll(inventory.create_bootstrap_token(name="t").secret, hostname).json()
    node = Node.objects.get(pk=grant["node_id"])
    inventory.record_inventory(node, sample_inventory())
    inventory.record_heartbeat(node, _beat(node))
    fleet.create_deployment(
        tenant=world.tenant_a,
        name="chat",
        model_name="chat",
        artifact_uri="synthetic://chat",
        replicas=1,
    )
    assert Revision.objects.filter(node=node, generation=1).exists()
    return Node.objects.get(pk=node.pk), grant["node_credential"]


def _beat(node: Node) -> Heartbeat:
    return Heartbeat(
        node_id=node.pk,
        sent_at=T0,
        agent_version="0.1.0",
        applied_generation=0,
        uptime_s=1.0,
    )


def _status(node: Node, *, at: datetime = T0, **changes: Any) -> dict[str, Any]:
    revision = Revision.objects.get(node=node, generation=1)
    return {
        "schema_version": 1,
        "node_id": str(node.pk),
        "generation": 1,
        "content_hash": revision.content_hash,
        "state": "applied",
        "components": [],
        "reported_at": at.isoformat(),
        **changes,
    }


def _post_status(credential: str, body: dict[str, Any]) -> int:
    response = as_node(credential).post(
        "/api/v1/agent/status/", json.dumps(body), content_type="application/json"
    )
    return int(response.status_code)


def test_a_repeated_status_report_is_acknowledged_and_stored_once(world: World) -> None:
    node, credential = _ready_node_with_revision(world)
    report = _status(node)
    assert _post_status(credential, report) == 204
    stored = Revision.objects.get(node=node, generation=1)
    assert stored.status == "applied" and stored.reported_at == T0

    # The agent resends what it saw no answer to: acknowledged, and nothing is written.
    with CaptureQueriesContext(connection) as queries:
        assert _post_status(credential, report) == 204
    writes = [q["sql"] for q in queries if q["sql"].lstrip().upper().startswith("UPDATE")]
    assert len(writes) == 1, writes  # the one conditional update, matching nothing
    again = Revision.objects.get(node=node, generation=1)
    assert again.updated_at == stored.updated_at
    assert AgentReport.objects.get(node=node).applied_generation == 1
    assert not fleet.record_applied_status(node, AppliedStatus.model_validate(report))

    # An older report arriving late never replaces a newer one.
    late = _status(node, at=T0 - timedelta(seconds=5), state="failed")
    assert _post_status(credential, late) == 204
    assert Revision.objects.get(node=node, generation=1).status == "applied"


def test_a_replayed_copy_never_hides_the_report_of_the_applied_one(world: World) -> None:
    """Pulled and applied, the same revision then arrives by push and is refused as a
    replay, while the applied report is still being retried: the revision stays pending
    (the node shows the replay), and becomes applied when the retried report lands."""
    node, credential = _ready_node_with_revision(world)
    replay = _status(
        node,
        at=T0 + timedelta(seconds=1),
        state="rejected",
        rejection_reason="replayed",
        detail="generation 1 is already applied",
    )
    assert _post_status(credential, replay) == 204
    assert Revision.objects.get(node=node, generation=1).status == "pending"
    assert Node.objects.get(pk=node.pk).last_rejection_reason == "replayed"

    assert _post_status(credential, _status(node)) == 204  # the retried report, older
    assert Revision.objects.get(node=node, generation=1).status == "applied"
    assert AgentReport.objects.get(node=node).applied_generation == 1


def _in_another_connection(call: Callable[[], Any]) -> Any:
    """Run `call` on a thread with its own connection, which gives up on any row lock at
    once (lock_timeout 1 ms) instead of waiting: whether a statement needs a lock another
    transaction holds is then an error, not a timing."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            with connection.cursor() as cursor:
                cursor.execute("SET lock_timeout = '1ms'")
            outcome["value"] = call()
        except BaseException as exc:  # noqa: BLE001  (handed to the test thread)
            outcome["error"] = exc
        finally:
            # the connection goes back to the pool: the setting must not go with it
            with connection.cursor() as cursor:
                cursor.execute("RESET lock_timeout")
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


@pytest.mark.django_db(transaction=True)
def test_heartbeats_and_status_reports_commit_while_planning_holds_the_fleets_row_locks(
    world: World,
) -> None:
    node, credential = _ready_node_with_revision(world)
    status = AppliedStatus.model_validate(_status(node))

    def heartbeat() -> None:
        heard = inventory.authenticate_node(credential)
        assert heard is not None
        inventory.record_heartbeat(heard, _beat(heard))

    def report() -> bool:
        heard = inventory.authenticate_node(credential)
        assert heard is not None
        return fleet.record_applied_status(heard, status)

    def touch_node_row() -> None:
        Node.objects.filter(pk=node.pk).update(maintenance_reason="x")

    before = AgentReport.objects.get(node=node).last_heartbeat_at
    with transaction.atomic():
        # What a planner placing across the whole fleet holds until it commits.
        fleet._lock(Tenant, Tenant.objects.values_list("pk", flat=True))  # noqa: SLF001
        fleet._lock(Deployment, Deployment.objects.values_list("pk", flat=True))  # noqa: SLF001
        fleet._lock(Node, Node.objects.values_list("pk", flat=True))  # noqa: SLF001
        fleet.reconcile_fleet(cause="a change elsewhere", nodes=[node.pk])

        _in_another_connection(heartbeat)
        assert _in_another_connection(report) is True
        with pytest.raises(OperationalError, match="lock"):
            _in_another_connection(touch_node_row)  # the locks are really held

        # Committed by the other connection, while the planner still holds its locks.
        committed = _in_another_connection(
            lambda: (
                AgentReport.objects.values_list("last_heartbeat_at", "applied_generation").get(
                    node=node
                ),
                Revision.objects.get(node=node, generation=1).status,
            )
        )
    (heard_at, applied), revision_status = committed
    assert heard_at > before and applied == 1 and revision_status == "applied"


def _join(hostname: str, token: str) -> str:
    """What one node's agent does to join: enroll, report its inventory, heartbeat."""
    grant = enroll(token, hostname).json()
    client = as_node(grant["node_credential"])
    body = synthetic_inventory(hostname)  # 8 GPUs, 8 NICs, 4 drives, 2 NUMA nodes
    assert (
        client.post(
            "/api/v1/agent/inventory/", body.model_dump_json(), content_type="application/json"
        ).status_code
        == 204
    )
    beat = Heartbeat(
        node_id=grant["node_id"],
        sent_at=T0,
        agent_version="0.1.0",
        applied_generation=0,
        uptime_s=1,
    ).model_dump_json()
    assert (
        client.post("/api/v1/agent/heartbeat/", beat, content_type="application/json").status_code
        == 204
    )
    return str(grant["node_credential"])


def test_enrolling_a_node_costs_a_fixed_handful_of_queries(
    db: Any, django_capture_on_commit_callbacks: Any
) -> None:
    token = inventory.create_bootstrap_token(name="batch", uses=12).secret
    counts = []
    for index in range(12):
        with (
            CaptureQueriesContext(connection) as queries,
            django_capture_on_commit_callbacks(execute=True),
        ):
            credential = _join(f"gpu-{index:02d}", token)
        counts.append(len(queries))
    assert Node.objects.filter(status="ready").count() == 12
    assert len(set(counts[1:])) == 1, f"the cost grows with the fleet: {counts}"
    # Enrollment 3 (the token, the node as one upsert, the token again), inventory 10 (the
    # node, host facts, each of 4 hardware tables read and written), heartbeat 3 (the node,
    # its report upserted, its status), and after commit one look for waiting work each for
    # the new GPUs and the node becoming ready; savepoints are the test's own transaction.
    assert counts[-1] <= 22, "\n".join(q["sql"][:150] for q in queries)

    # The periodic inventory report, unchanged: read, compared, nothing written.
    with CaptureQueriesContext(connection) as queries:
        response = as_node(credential).post(
            "/api/v1/agent/inventory/",
            synthetic_inventory("gpu-11").model_dump_json(),
            content_type="application/json",
        )
    assert response.status_code == 204
    written = [
        q["sql"][:60] for q in queries if q["sql"].split()[0] in ("INSERT", "UPDATE", "DELETE")
    ]
    assert written == [], written


def test_a_node_streaming_telemetry_counts_as_heard(
    world: World, settings: Any, django_capture_on_commit_callbacks: Any
) -> None:
    """A web process busy ingesting answers heartbeat requests late; the node's own stream,
    stored, counts as hearing it, so it is not taken for silent meanwhile."""
    node = make_node("gpu-1", gpus=1)
    Node.objects.filter(pk=node.pk).update(status="ready")
    settings.NODE_UNREACHABLE_AFTER_S = 30
    heard(node, timezone.now() - timedelta(seconds=31))  # its last heartbeat request, long ago
    with django_capture_on_commit_callbacks(execute=True):
        acks = telemetry.store_batches([batch(node, 1, gauges={"host.load1": 1.0})]).acks
    assert [a.outcome for a in acks] == ["stored"]
    assert inventory.mark_silent_nodes_unreachable() == 0
    assert Node.objects.get(pk=node.pk).status == "ready"


def _reports(first: int, count: int, *, at: datetime = T0, state: str = "applied") -> list[Any]:
    """(node, report) for `count` nodes, each with one revision (generation 1)."""
    found = []
    for index in range(first, first + count):
        node = make_node(f"bulk-{index}")
        content_hash = f"{index:064x}"
        Revision.objects.create(node=node, generation=1, content_hash=content_hash, document={})
        report = AppliedStatus(
            node_id=node.pk,
            generation=1,
            content_hash=content_hash,
            state=state,  # type: ignore[arg-type]
            components=[ComponentResult(kind="gateway", name="gateway", ok=False, error="busy")],
            reported_at=at,
        )
        found.append((node, report))
    return found


def test_reports_recorded_together_cost_the_same_statements_however_many(world: World) -> None:
    """The reports that come over the telemetry WebSocket are recorded together: as one
    by one (the newest of a revision's reports wins, a repeat writes nothing, an older one
    never replaces a newer one, a rejection lands on its node), in as many statements for
    six nodes as for two."""
    few, many = _reports(0, 2), _reports(10, 6)
    with CaptureQueriesContext(connection) as two:
        fleet.record_applied_statuses(few)
    older = [
        (node, r.model_copy(update={"reported_at": T0 - timedelta(seconds=1)})) for node, r in many
    ]
    with CaptureQueriesContext(connection) as six:
        fleet.record_applied_statuses([*older, *many])
    assert len(six) == len(two)
    for node, _ in [*few, *many]:
        revision = Revision.objects.get(node=node, generation=1)
        assert (revision.status, revision.reported_at) == ("applied", T0)
        assert revision.results == [
            {"kind": "gateway", "name": "gateway", "ok": False, "error": "busy"}
        ]
        assert AgentReport.objects.get(node=node).applied_generation == 1

    late = [(node, r.model_copy(update={"state": "failed"})) for node, r in older]
    rejected_node, rejected = _reports(20, 1)[0]
    refusal = rejected.model_copy(update={"state": "rejected", "rejection_reason": "replayed"})
    with CaptureQueriesContext(connection) as again:
        fleet.record_applied_statuses([*many, *late, (rejected_node, refusal)])
    writes = [q["sql"] for q in again if q["sql"].lstrip().upper().startswith(("UPDATE", "INSERT"))]
    assert len(writes) == 1, writes  # the rejection's, on its node
    assert {Revision.objects.get(node=n, generation=1).status for n, _ in many} == {"applied"}
    rejected_node.refresh_from_db()
    assert rejected_node.last_rejection_reason == "replayed"


def test_a_worker_address_recorded_together_comes_from_the_node_it_is_placed_on(
    world: World,
) -> None:
    """Other nodes' reports in the same flush name the same replica, later: the replica
    keeps the address its own node reported."""
    node, _ = _ready_node_with_revision(world)
    replica = Replica.objects.get(node=node)
    others = _reports(30, 3)

    def worker(port: int, url: str) -> ComponentResult:
        return ComponentResult(
            kind="worker", name=f"replica-{replica.pk}", ok=True, error=None, port=port, url=url
        )

    mine = AppliedStatus.model_validate(
        {**_status(node), "components": [worker(7001, "http://10.0.0.1:7001").model_dump()]}
    )
    claims = {
        "components": [worker(9999, "http://10.0.0.9:9999")],
        "reported_at": T0 + timedelta(seconds=1),
    }
    fleet.record_applied_statuses(
        [(node, mine), *((other, theirs.model_copy(update=claims)) for other, theirs in others)]
    )
    replica.refresh_from_db()
    assert (replica.port, replica.url) == (7001, "http://10.0.0.1:7001")
