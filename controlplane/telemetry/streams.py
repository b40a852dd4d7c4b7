"""Live streams: the channel-layer groups ingest fans out to, and the shape of their deltas.

A dashboard subscribes to a stream by name; ingest sends one delta per stream per flush
(about once a second) after the batches behind it are committed. Channel layers may drop
messages, so a delta is only ever an addition to what the REST snapshot already showed;
a dashboard that missed some reloads the snapshot.

Streams and their deltas (``point`` has the same shape as the snapshot API's points):

``fleet``                 ``{"type": "fleet.delta", "nodes": [{"id", "hostname", "status",
                            "t", "gauges": {key: value}}]}`` (latest gauges per node)
``node:<node id>``        ``{"type": "node.delta", "node_id", "point": {"t", "gauges"}}``
``deployment:<id>``       ``{"type": "deployment.delta", "deployment_id", "point": {"t",
                            "window_s", "latency": {metric: {"p50", "p90", "p99", "count"}},
                            "usage": {"completed", "failed", "rejected", "cancelled",
                            "input_tokens", "output_tokens"}, "tokens_per_s",
                            "queue_depth"}}``
``tenant:<tenant id>``    ``{"type": "tenant.delta", "tenant_id", "deployments":
                            {deployment id: point}}`` (points of the same shape, grouped)

A deployment serves its owner tenant and the tenants it is shared with. Its own stream's
points total every tenant it serves, and only its owner's members (and platform admins)
may subscribe. A tenant's stream has a point for each deployment serving it, owned or
shared, made of that tenant's own series and usage only; ``queue_depth`` is the workers'
queue, whoever's requests wait in it. A flush sends a tenant a point only for the
deployments that tenant's own traffic touched.

``t`` is the newest ``interval_end`` among the batches merged, in Unix seconds, so a client
can tell how far behind the agent's clock it is.
"""

from __future__ import annotations

from uuid import UUID

FLEET = "fleet"


def node(node_id: UUID | str) -> str:
    return f"node:{node_id}"


def deployment(deployment_id: UUID | str) -> str:
    return f"deployment:{deployment_id}"


def tenant(tenant_id: UUID | str) -> str:
    return f"tenant:{tenant_id}"


def group_name(stream: str) -> str:
    """Channel-layer group names allow only ASCII alphanumerics, hyphens, underscores and
    periods, so the stream's colon becomes a period."""
    return "live." + stream.replace(":", ".")
