"""WebSocket routes: agents stream telemetry in; dashboards receive live deltas.

Agents authenticate with their node credential in a header, which no other site can make
a browser send, so their route skips the Origin check (agents send no Origin). Dashboards
ride the session cookie, so theirs only accepts pages served by one of ALLOWED_HOSTS.
"""

from channels.auth import AuthMiddlewareStack
from channels.security.websocket import AllowedHostsOriginValidator
from django.urls import path

from controlplane.telemetry.consumers import AgentTelemetryConsumer
from controlplane.telemetry.live import DashboardConsumer

websocket_urlpatterns = [
    path("ws/agent/", AgentTelemetryConsumer.as_asgi()),
    path(
        "ws/dashboard/",
        AllowedHostsOriginValidator(AuthMiddlewareStack(DashboardConsumer.as_asgi())),
    ),
]
