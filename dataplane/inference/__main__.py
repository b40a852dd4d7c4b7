"""``python -m dataplane.inference --config PATH [--host H] [--port P]``: run a worker.

The model is loaded before the port opens, so ``GET /health`` answering means ready.
``--port 0`` takes any free port; ``--announce FILE`` then says which, once bound, with
the nonce that this start's ``/health`` answers too (with ``--replica-id``), so
whoever started it knows it is talking to this process and not another on that port.
The nonce comes in the environment (``TAILGUARD_WORKER_NONCE``), not on the command line
that any user on the host can read in /proc.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
from pathlib import Path

import uvicorn

from dataplane.asgi import announce, bind
from dataplane.inference.config import WorkerConfig
from dataplane.inference.server import Identity, InferenceApp, Worker
from dataplane.mux import MAX_FRAME

NONCE_ENV = "TAILGUARD_WORKER_NONCE"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dataplane.inference", description="Tailguard inference worker"
    )
    parser.add_argument("--config", type=Path, required=True, help="WorkerConfig JSON file")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port")
    parser.add_argument("--replica-id", default=None, help="answered by /health")
    parser.add_argument("--announce", type=Path, default=None, help="write the bound port here")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    nonce = os.environ.get(NONCE_ENV) or None
    worker = Worker(
        WorkerConfig.load(args.config),
        args.config,
        identity=Identity(replica_id=args.replica_id, nonce=nonce),
    )
    sock = bind(args.host, args.port)
    if args.announce is not None:
        announce(args.announce, sock.getsockname()[1], nonce)
    app = InferenceApp(worker)
    server = _Server(
        app,
        uvicorn.Config(
            app,
            lifespan="on",
            log_level=args.log_level,
            access_log=False,
            timeout_graceful_shutdown=10,
            proxy_headers=False,  # whether a client is on loopback is the socket's to say
            # The gateways' mux connections: frames of tokens, not worth compressing.
            ws="websockets-sansio",
            ws_per_message_deflate=False,
            ws_max_size=MAX_FRAME,
        ),
    )
    server.run(sockets=[sock])
    return 0


class _Server(uvicorn.Server):
    """uvicorn's server, ending the app's state streams as it starts shutting down."""

    def __init__(self, app: InferenceApp, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._app = app

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._app.close_streams()
        await super().shutdown(sockets)


if __name__ == "__main__":
    raise SystemExit(main())
