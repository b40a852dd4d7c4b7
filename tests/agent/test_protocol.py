"""The wire models: round trips, strict rejection with the field named, canonical bytes."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from agent.protocol import (
    AppliedStatus,
    Components,
    DesiredState,
    Enrollment,
    EnrollmentGrant,
    GatewaySpec,
    Heartbeat,
    Inventory,
    PoolSpec,
    SignedDesiredState,
    TelemetryBatch,
    canonical_json,
    content_hash,
)
from tests.agent import samples

MESSAGES = samples.all_messages()


def _model(message: object) -> BaseModel:
    assert isinstance(message, BaseModel), f"{message!r} is not a pydantic model"
    return message


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips_through_json(message: object) -> None:
    model = _model(message)
    wire = model.model_dump_json()
    assert type(model).model_validate_json(wire) == model
    # The control plane may hand over a dict parsed by its web framework instead of raw JSON.
    assert type(model).model_validate(json.loads(wire)) == model


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_carries_schema_version_1(message: object) -> None:
    assert json.loads(_model(message).model_dump_json())["schema_version"] == 1


def _errors(
    model: type[BaseModel], data: dict[str, Any]
) -> list[tuple[tuple[str | int, ...], str]]:
    with pytest.raises(ValidationError) as excinfo:
        model.model_validate(data)
    return [(tuple(e["loc"]), e["msg"]) for e in excinfo.value.errors()]


def _wire(message: BaseModel) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(message.model_dump_json())
    return data


def _first(kind: type[BaseModel]) -> dict[str, Any]:
    return _wire(next(_model(m) for m in MESSAGES if type(m) is kind))


def _applied_rejected() -> dict[str, Any]:
    return _wire([_model(m) for m in MESSAGES if type(m) is AppliedStatus][1])


def test_unknown_top_level_field_is_rejected_by_name() -> None:
    data = _first(Heartbeat) | {"load_average": 0.5}
    assert _errors(Heartbeat, data) == [(("load_average",), "Extra inputs are not permitted")]


def test_unknown_nested_field_is_rejected_with_its_path() -> None:
    data = _first(Inventory)
    data["gpus"][0]["temperature_c"] = 40
    assert _errors(Inventory, data)[0][0] == ("gpus", 0, "temperature_c")


@pytest.mark.parametrize("version", [2, 0, True, "1", 1.0])
def test_schema_version_other_than_integer_1_is_rejected(version: object) -> None:
    data = _first(Heartbeat) | {"schema_version": version}
    assert _errors(Heartbeat, data)[0][0] == ("schema_version",)


def _mutate(data: dict[str, Any], path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    target: Any = data
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return data


MALFORMED: list[tuple[type[BaseModel], tuple[str | int, ...], Any, tuple[str | int, ...]]] = [
    # (model, path to change, new value, loc the error must name)
    (Heartbeat, ("applied_generation",), -1, ("applied_generation",)),
    (Heartbeat, ("applied_generation",), "6", ("applied_generation",)),
    (Heartbeat, ("applied_generation",), True, ("applied_generation",)),
    (Heartbeat, ("sent_at",), "2025-03-01T12:00:00", ("sent_at",)),
    (Heartbeat, ("node_id",), "node-1", ("node_id",)),
    (Heartbeat, ("agent_version",), "0.1 beta", ("agent_version",)),
    (Inventory, ("gpus", 0, "pci_bus_id"), "00000000:17:00.0", ("gpus", 0, "pci_bus_id")),
    (Inventory, ("gpus", 0, "pci_bus_id"), "0000:17:00.0\n", ("gpus", 0, "pci_bus_id")),
    (Inventory, ("gpus", 0, "mig_mode"), "on", ("gpus", 0, "mig_mode")),
    (Inventory, ("gpus", 0, "numa_node"), -1, ("gpus", 0, "numa_node")),
    (Inventory, ("nics", 0, "state"), "4: ACTIVE", ("nics", 0, "state")),
    (Inventory, ("nics", 0, "link_layer"), "ethernet", ("nics", 0, "link_layer")),
    (Inventory, ("nics", 0, "width"), "4x", ("nics", 0, "width")),
    (Inventory, ("drives", 0, "logical_block_size"), 520, ("drives", 0, "logical_block_size")),
    (Inventory, ("numa", 0, "cpulist"), "0-47 96-143", ("numa", 0, "cpulist")),
    (Inventory, ("host", "cpu_count"), 0, ("host", "cpu_count")),
    (Enrollment, ("bootstrap_token",), "short", ("bootstrap_token",)),
    (Enrollment, ("hostname",), "other-node", ("host",)),
    (EnrollmentGrant, ("queue",), "agent.someone-else", ("queue",)),
    (EnrollmentGrant, ("control_plane_public_key",), "AAAA", ("control_plane_public_key",)),
    (EnrollmentGrant, ("control_plane_public_key",), "not base64!", ("control_plane_public_key",)),
    (EnrollmentGrant, ("heartbeat_interval_s",), 0, ("heartbeat_interval_s",)),
    (DesiredState, ("generation",), 0, ("generation",)),
    (DesiredState, ("content_hash",), "A" * 64, ("content_hash",)),
    (
        DesiredState,
        ("components", "workers", 0, "port"),
        70000,
        ("components", "workers", 0, "port"),
    ),
    (
        DesiredState,
        ("components", "workers", 0, "tenants", 0, "weight"),
        0,
        ("components", "workers", 0, "tenants", 0, "weight"),
    ),
    (
        DesiredState,
        ("components", "workers", 0, "runtime_options"),
        {"nested": {"a": 1}},
        ("components", "workers", 0, "runtime_options", "nested", "str"),
    ),
    (DesiredState, ("components", "exports", 0, "volume"), "unknown", ("components", "exports")),
    (DesiredState, ("components", "qos", 0, "volume"), "unknown", ("components", "qos")),
    (
        DesiredState,
        ("components", "exports", 0, "transport"),
        "fc",
        ("components", "exports", 0, "transport"),
    ),
    (
        DesiredState,
        ("components", "slo_thresholds", 0, "threshold_seconds"),
        None,
        ("components", "slo_thresholds", 0, "threshold_seconds"),
    ),
    (
        DesiredState,
        ("components", "slo_thresholds", 1, "threshold_seconds"),
        1.0,
        ("components", "slo_thresholds", 1, "threshold_seconds"),
    ),
    (AppliedStatus, ("rejection_reason",), None, ("rejection_reason",)),
    (AppliedStatus, ("rejection_reason",), "expired", ("rejection_reason",)),
    (AppliedStatus, ("state",), "applied", ("rejection_reason",)),
    (TelemetryBatch, ("seq",), -1, ("seq",)),
    (TelemetryBatch, ("interval_end",), "2025-03-01T11:59:59Z", ("interval_end",)),
    (TelemetryBatch, ("gauges", "gpu.0.utilization"), "NaN", ("gauges", "gpu.0.utilization")),
    (TelemetryBatch, ("counters", "requests_total"), 1.5, ("counters", "requests_total")),
    (TelemetryBatch, ("series", 0, "sketch"), "%%%", ("series", 0, "sketch")),
    (
        TelemetryBatch,
        ("series", 0, "thresholds", 0, "good"),
        121,
        ("series", 0, "thresholds", 0, "total"),
    ),
    (TelemetryBatch, ("series", 0, "metric"), "availability", ("series", 0, "metric")),
]


@pytest.mark.parametrize(
    ("model", "path", "value", "loc"),
    MALFORMED,
    ids=[f"{m.__name__}-{'.'.join(map(str, p))}={v!r}" for m, p, v, _ in MALFORMED],
)
def test_malformed_field_fails_naming_the_field(
    model: type[BaseModel], path: tuple[str | int, ...], value: Any, loc: tuple[str | int, ...]
) -> None:
    data = _applied_rejected() if model is AppliedStatus else _first(model)
    locations = [error_loc for error_loc, _ in _errors(model, _mutate(data, path, value))]
    assert loc in locations, f"expected an error at {loc}, got {locations}"


def test_failed_component_needs_its_error_text() -> None:
    data = _first(AppliedStatus)
    data["components"][1]["error"] = None
    assert _errors(AppliedStatus, data)[0][0] == ("components", 1, "error")


def test_duplicate_worker_ports_are_rejected() -> None:
    data = _first(DesiredState)
    worker = data["components"]["workers"][0]
    data["components"]["workers"].append(
        worker | {"replica_id": "00000000-0000-4000-8000-000000000001"}
    )
    assert _errors(DesiredState, data) == [
        (("components", "workers"), "Value error, duplicate worker port 8101")
    ]


def test_messages_are_immutable() -> None:
    state = samples.desired_state()
    with pytest.raises(ValidationError):
        state.generation = 8


def test_canonical_json_is_compact_sorted_and_utf8() -> None:
    assert canonical_json(Components()) == (
        b'{"exports":[],"qos":[],"slo_thresholds":[],"volumes":[],"workers":[]}'
    )
    batch = _model(MESSAGES[-1])
    text = canonical_json(batch).decode("utf-8")
    assert json.loads(text) == json.loads(batch.model_dump_json())
    assert ": " not in text and ", " not in text
    keys = list(json.loads(text))
    assert keys == sorted(keys)


def test_canonical_json_keeps_non_ascii_as_utf8() -> None:
    worker = samples.components().workers[0].model_copy(update={"model_name": "modèle-ünï"})
    assert "modèle-ünï".encode() in canonical_json(worker)


def test_canonical_json_is_stable_across_a_wire_round_trip() -> None:
    state = samples.desired_state()
    again = DesiredState.model_validate_json(state.model_dump_json(indent=4))
    assert canonical_json(again) == canonical_json(state)


def test_canonical_json_ignores_dict_insertion_order() -> None:
    batch = _first(TelemetryBatch)
    reordered = batch | {"gauges": dict(reversed(list(batch["gauges"].items())))}
    assert canonical_json(TelemetryBatch.model_validate(reordered)) == canonical_json(
        TelemetryBatch.model_validate(batch)
    )


def test_content_hash_is_sha256_of_canonical_components_and_tracks_changes() -> None:
    components = samples.components()
    empty = b'{"exports":[],"qos":[],"slo_thresholds":[],"volumes":[],"workers":[]}'
    assert content_hash(Components()) == hashlib.sha256(empty).hexdigest()
    # a gateway, added after version 1 shipped, is on the wire only where a node runs one
    assert canonical_json(Components(gateway=GatewaySpec())).startswith(
        b'{"exports":[],"gateway":{}'
    )
    changed = components.model_copy(update={"volumes": []})
    assert content_hash(components) != content_hash(changed)
    assert samples.desired_state().content_hash == content_hash(components)


def test_signed_envelope_without_signature_parses_so_it_can_be_reported() -> None:
    data = _first(SignedDesiredState)
    del data["signature"]
    assert SignedDesiredState.model_validate(data).signature is None


def test_pools_without_an_aio_path_keep_the_bytes_earlier_agents_know() -> None:
    nvme = PoolSpec(name="nvme0", kind="spdk", device="0000:5e:00.0")
    assert canonical_json(nvme) == (
        b'{"capacity_bytes":null,"device":"0000:5e:00.0","directory":null,"kind":"spdk",'
        b'"name":"nvme0"}'
    )
    on_file = PoolSpec(name="file0", kind="spdk", aio_path="/srv/pool.img", capacity_bytes=1 << 30)
    assert PoolSpec.model_validate_json(canonical_json(on_file)) == on_file


@pytest.mark.parametrize(
    "text", ["QUJD", "QUI=", "QQ==", "", "QUJDRA==", "+/+/"], ids=lambda t: t or "empty"
)
def test_base64_text_that_the_pattern_admits_decodes(text: str) -> None:
    import base64

    from pydantic import TypeAdapter

    from agent.protocol import Base64Bytes

    assert TypeAdapter(Base64Bytes).validate_python(text) == text
    base64.b64decode(text, validate=True)


@pytest.mark.parametrize("text", ["QUJ", "QU=D", "QUJD=", "QUJD\\n", "QU JD", "QUJ-", "Q===", "="])
def test_base64_text_that_does_not_decode_is_refused(text: str) -> None:
    from pydantic import TypeAdapter, ValidationError

    from agent.protocol import Base64Bytes

    with pytest.raises(ValidationError):
        TypeAdapter(Base64Bytes).validate_python(text)
