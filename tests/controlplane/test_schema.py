"""Property-based API testing: schemathesis drives every operation of /api/schema/.

Every check runs, as a platform admin, a tenant admin and a tenant viewer: it finds any
5xx, any response that disagrees with the published schema, any undocumented status
code or content type, and any request the API judges differently from its schema.
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from django.core.wsgi import get_wsgi_application
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig

from controlplane.tenancy.services import issue_api_token, issue_inference_key
from tests.controlplane.conftest import World, make_node

POSITIVE = ["2xx", "3xx", "401", "403", "404", "409", "429"]

# A schema-valid body may still name objects that do not exist: a random tenant, node,
# pool or artifact id, or username, is a well-formed reference the API rightly refuses
# with a 400 naming the field. So may a PagerDuty `routing_key` sent with another
# `format` (the field's description says so), and a generated `expires_at` of "" that
# schemathesis' coverage phase sends as valid although it is no date-time.
REFERENCES = (
    "^/api/v1/(artifacts|bootstrap-tokens|deployments|exports|inference-keys|memberships|"
    "nodes|pools|qos-policies|slos|volumes|webhook-endpoints|api-tokens)/"
)

config = SchemathesisConfig.from_dict(
    {
        "operations": [
            {
                "include-path-regex": REFERENCES,
                "include-method-regex": "^(POST|PUT|PATCH)$",
                "checks": {"positive_data_acceptance": {"expected-statuses": [*POSITIVE, "400"]}},
            }
        ]
    }
)
schema = schemathesis.openapi.from_wsgi("/api/schema/", get_wsgi_application(), config=config)


@pytest.fixture(params=["platform", "admin_a", "viewer_a"])
def token(request: pytest.FixtureRequest, transactional_db: Any, world: World) -> str:
    """Objects for every endpoint, and a token of the role under test."""
    make_node("gpu-a", world.tenant_a, gpus=2)
    make_node("gpu-b", world.tenant_b, gpus=1)
    issue_inference_key(tenant=world.tenant_a, name="k")
    return issue_api_token(user=getattr(world, request.param), name="schemathesis").secret


@schema.parametrize()
@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_schema(case: Any, token: str) -> None:
    case.call_and_validate(headers={"Authorization": f"Bearer {token}"})
