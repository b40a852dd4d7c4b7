"""`python -m agent.discovery`: print this machine's Inventory as JSON, to check a new node."""

from __future__ import annotations

import argparse
import logging

from agent.discovery import discover


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m agent.discovery", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each collector saw")
    args = parser.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
    print(discover().model_dump_json(indent=2))


if __name__ == "__main__":
    main()
