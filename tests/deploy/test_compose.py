"""deploy/compose.yaml against the Compose specification, and the image's Dockerfile."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
import yaml
from check_jsonschema.builtin_schemas import get_builtin_schema
from dockerfile_parse import DockerfileParser

from tests.deploy.commands import DEPLOY, parse

LONG_RUNNING = ("web", "worker", "beat")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = get_builtin_schema("vendor.compose-spec")  # compose-spec's own JSON schema
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors, "\n".join(errors)


def test_the_schema_check_rejects_a_misspelt_key(compose: dict[str, Any]) -> None:
    schema = get_builtin_schema("vendor.compose-spec")
    broken = {**compose, "services": {**compose["services"], "web": {"image": "x", "comand": []}}}
    assert not jsonschema.validators.validator_for(schema)(schema).is_valid(broken)


def test_stack_has_its_services_with_healthchecks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"postgres", "redis", "migrate", *LONG_RUNNING}
    for name in ("postgres", "redis", "web", "worker"):
        assert services[name]["healthcheck"]["test"], f"{name} has no healthcheck"


def test_control_plane_waits_for_healthy_servers_and_finished_migrations(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    assert services["migrate"]["restart"] == "no"
    assert services["migrate"]["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "redis": {"condition": "service_healthy"},
    }
    for name in LONG_RUNNING:
        depends = services[name]["depends_on"]
        assert depends["migrate"] == {"condition": "service_completed_successfully"}, name
        assert depends["postgres"] == depends["redis"] == {"condition": "service_healthy"}, name


def test_service_commands_are_the_projects_own(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert parse(services["migrate"]["command"])["command"] == "migrate"
    assert parse(services["web"]["command"])["app"] == "controlplane.asgi:application"
    # its uvicorn workers share /metrics counters in a tmpfs, empty at each start
    shared = services["web"]["environment"]["PROMETHEUS_MULTIPROC_DIR"]
    assert any(mount.split(":")[0] == shared for mount in services["web"]["tmpfs"])
    worker = parse(services["worker"]["command"])
    assert worker["command"] == "worker" and "-B" not in services["worker"]["command"]
    assert parse(services["beat"]["command"])["command"] == "beat"
    assert services["beat"]["deploy"]["replicas"] == 1


def test_control_plane_gets_redis_postgres_and_the_signing_key(compose: dict[str, Any]) -> None:
    env = compose["services"]["web"]["environment"]
    assert (
        env["DATABASE_URL"].startswith("postgres://") and "@postgres:5432/" in env["DATABASE_URL"]
    )
    assert env["REDIS_URL"] == "redis://redis:6379/0"
    assert env["SIGNING_KEY_FILE"] == "/run/secrets/signing_key"
    assert compose["services"]["web"]["secrets"] == ["signing_key"]
    assert "signing_key" in compose["secrets"]


def test_dockerfile_builds_the_frontend_when_present_then_the_python_image() -> None:
    dockerfile = DockerfileParser(str(DEPLOY / "Dockerfile"))
    assert dockerfile.is_multistage
    froms = [i["value"] for i in dockerfile.structure if i["instruction"] == "FROM"]
    assert froms[0].startswith("node:") and froms[0].endswith(" AS frontend")
    assert froms[-1].startswith("python:") and "-slim" in froms[-1]
    runs = " ".join(i["value"] for i in dockerfile.structure if i["instruction"] == "RUN")
    assert "[ -f frontend/package.json ]" in runs and "npm run build" in runs
    assert "pip install" in runs and "manage.py collectstatic --noinput" in runs
    cmd = next(i["value"] for i in dockerfile.structure if i["instruction"] == "CMD")
    assert parse(json.loads(cmd))["app"] == "controlplane.asgi:application"
    assert dockerfile.envs["TAILGUARD_DATA_DIR"] == "/var/lib/tailguard"
