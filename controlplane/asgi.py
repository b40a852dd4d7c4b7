"""ASGI entry point: HTTP through Django, WebSockets through Channels."""

import os
import sys

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")

# While telemetry ingest's flush thread computes, the event loop and the thread that runs
# the views wait for the interpreter lock each time they wake: at most this long, instead
# of the default 5 ms, so requests of a web process that ingests are not slowed many-fold.
sys.setswitchinterval(0.001)

from controlplane.core.asgi import get_asgi_application  # noqa: E402  (sets Django up)

django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402  (needs apps loaded)

from controlplane.telemetry.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {"http": django_asgi_app, "websocket": URLRouter(websocket_urlpatterns)}
)
