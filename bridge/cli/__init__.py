"""The ``jmix-bridge`` command line: one sub-command per verb.

Each module of this package adds its verbs through ``register(subparsers)``.
Exit codes: 0 success, 1 runtime failure, 2 bad usage or malformed input,
3 verification failed.
"""

import argparse
import importlib
import sys

from bridge import __version__

# Modules that contribute sub-commands, in the order --help lists them.
_COMMAND_MODULES = (
    "bridge.cli.envelope",
    "bridge.cli.governance",
    "bridge.cli.daemon",
    "bridge.cli.admin",
)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_VERIFICATION = 3


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every available sub-command."""
    parser = argparse.ArgumentParser(
        prog="jmix-bridge",
        description="Carry DICOM studies between sites in encrypted, signed JMIX "
        "envelopes.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line and return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return int(args.handler(args) or EXIT_OK)
