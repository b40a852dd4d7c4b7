"""The advisory lock that serialises planning of pool room across processes: volumes
(storage) and replicas' model volumes (fleet) are placed in the same pools, so both take
it before placing there. Fleet plans without model volumes take row locks only."""

from __future__ import annotations

from django.db import connection

FLEET_LOCK_ID = 0x7461696C


def lock_fleet() -> None:
    """Serialise placement into storage pools until the transaction ends."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [FLEET_LOCK_ID])
