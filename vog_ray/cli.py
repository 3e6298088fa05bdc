"""Command line: ``vog-ray score|rerun|demo|report|diff|make-shards|reaudit``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

# Each module registers its own subcommand through ``register(subparsers)``, which adds a parser
# and sets ``func`` (called with the parsed namespace, returning an exit code).
COMMAND_MODULES: tuple[str, ...] = (
    "vog_ray.commands",
    "vog_ray.make_shards",
    "vog_ray.reaudit",
    "vog_ray.report",
    "vog_ray.diff",
)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="vog-ray", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vog-ray`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
