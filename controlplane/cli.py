"""`tailguard`: the operator's command line (demo, bench, manage)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from controlplane.processes import DemoPorts, url

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCHES = ("push", "serving", "storage", "telemetry", "slo", "parity", "gateway")


def _setup_django() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")
    import django

    django.setup()


def cmd_demo(args: argparse.Namespace) -> int:
    """Checks its ports before Django loads, so a busy one fails at once and PUBLIC_URL (unless
    set) follows --port in this process and every one it starts."""
    if args.nodes < 0:
        raise SystemExit("--nodes must be 0 or more")
    ports = DemoPorts.following(args.port)
    ports.check_free(args.host)
    os.environ.setdefault("PUBLIC_URL", url(args.host, ports.control_plane))
    _setup_django()
    from controlplane.demo import run_demo

    return run_demo(host=args.host, ports=ports, nodes=args.nodes, tour_enabled=not args.no_tour)


def cmd_bench(args: argparse.Namespace) -> int:
    """Benchmarks live with the tests, so they run from a source checkout."""
    if not (REPO_ROOT / "tests" / "bench").is_dir():
        print("tailguard bench needs a source checkout (tests/bench not found).", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO_ROOT))
    try:
        module = importlib.import_module(f"tests.bench.{args.name}")
    except ModuleNotFoundError:
        print(
            f"No benchmark named {args.name!r}; choose from {', '.join(BENCHES)}.", file=sys.stderr
        )
        return 2
    return int(module.main(args.rest))


def cmd_manage(args: argparse.Namespace) -> int:
    from django.core.management import execute_from_command_line

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")
    execute_from_command_line(["tailguard manage", *args.rest])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tailguard", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the control plane on embedded defaults, seeded")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument(
        "--port",
        type=int,
        default=8000,
        help="the control plane's port; the demo also listens on the next two (default 8000)",
    )
    demo.add_argument("--nodes", type=int, default=0, help="simulated nodes to add")
    demo.add_argument(
        "--no-tour", action="store_true", help="start and seed everything, but send no load"
    )
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", help=f"run a benchmark ({', '.join(BENCHES)})")
    bench.add_argument("name")
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)

    manage = sub.add_parser("manage", help="Django management commands", add_help=False)
    manage.add_argument("rest", nargs=argparse.REMAINDER)
    manage.set_defaults(func=cmd_manage)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
