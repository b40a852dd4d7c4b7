"""``python -m dataplane.gateway --config PATH``: run a gateway.

It listens on the config's host and port; port 0 takes any free port, and ``announce``
(in the config) then says which once bound, with the nonce that this start's ``/health``
answers too. The nonce comes in the environment (``TAILGUARD_GATEWAY_NONCE``), as the
worker's does.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import uvicorn

from dataplane.asgi import announce, bind
from dataplane.gateway.config import NONCE_ENV, GatewayConfig
from dataplane.gateway.server import Gateway, GatewayApp


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dataplane.gateway", description="Tailguard OpenAI gateway"
    )
    parser.add_argument("--config", type=Path, required=True, help="GatewayConfig JSON file")
    parser.add_argument(
        "--port", type=int, help="listen here rather than on the config's port (0: any free)"
    )
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = GatewayConfig.load(args.config)
    nonce = os.environ.get(NONCE_ENV) or None
    gateway = Gateway(config, args.config, nonce=nonce)
    sock = bind(config.host, config.port if args.port is None else args.port)
    if config.announce is not None:
        announce(config.announce, sock.getsockname()[1], nonce)
    server = uvicorn.Server(
        uvicorn.Config(
            GatewayApp(gateway),
            lifespan="on",
            log_level=args.log_level,
            access_log=False,
            timeout_graceful_shutdown=10,
        )
    )
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
