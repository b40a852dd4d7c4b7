"""The advisory lock that serialises planning across processes: replicas (fleet) and
volumes (storage) are placed in the same pools, so both plan under it."""

from __future__ import annotations

from django.db import connection

FLEET_LOCK_ID = 0x7461696C


def lock_fleet() -> None:
    """Serialise planning (placement of replicas and volumes) until the transaction ends."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [FLEET_LOCK_ID])
