"""``python -m dataplane.inference --config PATH [--host H] [--port P]``: run a worker.

The model is loaded before the port opens, so ``GET /health`` answering means ready.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import uvicorn

from dataplane.inference.config import WorkerConfig
from dataplane.inference.server import InferenceApp, Worker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dataplane.inference", description="Tailguard inference worker"
    )
    parser.add_argument("--config", type=Path, required=True, help="WorkerConfig JSON file")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    worker = Worker(WorkerConfig.load(args.config), args.config)
    uvicorn.run(
        InferenceApp(worker),
        host=args.host,
        port=args.port,
        lifespan="on",
        log_level=args.log_level,
        access_log=False,
        timeout_graceful_shutdown=10,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
