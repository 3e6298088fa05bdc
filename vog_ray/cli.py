"""vog-ray: rank every example of an image dataset by Variance of Gradients, on Ray.

Subcommands: score, rerun, demo, report, diff, make-shards, reaudit; `vog-ray COMMAND --help`
describes each.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

logger = logging.getLogger(__name__)

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
    """Entry point of the ``vog-ray`` console script.

    Errors in what the user gave (arguments, data, checkpoints, an output folder) and failed
    jobs end with their message and exit code 1; ``--verbose`` adds the traceback.
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except user_errors() as error:
        logger.error("%s: %s", type(error).__name__, error, exc_info=args.verbose)
        return 1


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that explain themselves: raised for bad input or a failed job."""
    from vog_ray.audit_files import AuditUnreadable
    from vog_ray.checkpoints import CheckpointError
    from vog_ray.config import ConfigError
    from vog_ray.models import ModelSpecError
    from vog_ray.plan import ResumeRefused
    from vog_ray.pool import JobFailed
    from vog_ray.shard_sources import MakeShardsError
    from vog_ray.worker import SampleFailure

    return (AuditUnreadable, CheckpointError, ConfigError, ModelSpecError, ResumeRefused,
            JobFailed, MakeShardsError, SampleFailure, FileNotFoundError, FileExistsError)


if __name__ == "__main__":
    sys.exit(main())
