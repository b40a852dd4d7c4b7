"""Property-based API testing: schemathesis drives every operation of /api/schema/.

It finds any 5xx, any response that disagrees with the published schema and any
undocumented status code or content type.
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from django.core.wsgi import get_wsgi_application
from hypothesis import HealthCheck, settings
from schemathesis import checks

from controlplane.tenancy.services import issue_api_token, issue_inference_key
from tests.controlplane.conftest import World, make_node

schema = schemathesis.openapi.from_wsgi("/api/schema/", get_wsgi_application())


@pytest.fixture
def seeded(transactional_db: Any, world: World) -> str:
    """Objects for every endpoint, and a platform admin's token (it may call them all)."""
    make_node("gpu-a", world.tenant_a, gpus=2)
    make_node("gpu-b", world.tenant_b, gpus=1)
    issue_inference_key(tenant=world.tenant_a, name="k")
    return issue_api_token(user=world.platform, name="schemathesis").secret


# Every check but the two that guess whether data "should" be accepted: a reference to
# a random (nonexistent) tenant id is schema-valid yet rightly a 400, and an empty
# filter parameter (`?tenant=`) means "no filter", as django-filter defines it.
HEURISTIC_CHECKS = [checks.positive_data_acceptance, checks.negative_data_rejection]


@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_schema(case: Any, seeded: str) -> None:
    case.call_and_validate(
        headers={"Authorization": f"Bearer {seeded}"}, excluded_checks=HEURISTIC_CHECKS
    )
