"""``jmix-bridge run`` and ``jmix-bridge check-config``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bridge import defaults
from bridge.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from bridge.config import load_config
from bridge.errors import BridgeError, ConfigError


def register(subparsers) -> None:
    """Add the daemon's verbs to the command line."""
    run = subparsers.add_parser(
        "run",
        help="run the bridge (DICOM listener, HTTP server, workers)",
        description="Run the bridge until SIGTERM or SIGINT. Without -c it runs on "
        "its embedded defaults: state, spool and keys under ./jmix-bridge-data, "
        "DICOM on port 11112, HTTP on 127.0.0.1:8080, every study sent to itself "
        "and forwarded to the PACS at 127.0.0.1:4242 (AE title ORTHANC).",
    )
    run.add_argument("-c", "--config", help="the YAML configuration file")
    _quick_start_options(run)
    run.set_defaults(handler=_run)

    check = subparsers.add_parser(
        "check-config",
        help="validate a configuration and report every problem",
        description="Read the configuration, check every key, type, reference and "
        "key file, and print each problem with its path. Exit code 0 when valid, 2 "
        "when not.",
    )
    check.add_argument("-c", "--config", help="the YAML configuration file")
    _quick_start_options(check)
    check.set_defaults(handler=_check)


def _quick_start_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "embedded defaults", "used only without -c, to move the quick start around"
    )
    group.add_argument(
        "--data-dir",
        default=str(defaults.DATA_DIR),
        help="folder for state, spool and keys (default: %(default)s)",
    )
    group.add_argument(
        "--dicom-port",
        type=int,
        default=defaults.DICOM_PORT,
        help="DICOM listener port (default: %(default)s)",
    )
    group.add_argument(
        "--http-port",
        type=int,
        default=defaults.HTTP_PORT,
        help="HTTP port on 127.0.0.1 (default: %(default)s)",
    )
    group.add_argument(
        "--pacs",
        default="ORTHANC@127.0.0.1:4242",
        help="where opened studies go, AE@HOST:PORT (default: %(default)s)",
    )
    group.add_argument(
        "--quiet-seconds",
        type=float,
        default=10.0,
        help="seal a study after this long without a new instance "
        "(default: %(default)s)",
    )


def _load(args: argparse.Namespace):
    if args.config:
        return load_config(args.config)
    ae, _, address = args.pacs.partition("@")
    host, _, port = address.rpartition(":")
    if not ae or not host or not port.isdigit():
        raise ConfigError([f"--pacs: expected AE@HOST:PORT, got {args.pacs!r}"])
    return defaults.quick_start_config(
        Path(args.data_dir),
        dicom_port=args.dicom_port,
        http_port=args.http_port,
        pacs={"ae_title": ae, "host": host, "port": int(port)},
        quiet_seconds=args.quiet_seconds,
    )


def _check(args: argparse.Namespace) -> int:
    try:
        config = _load(args)
    except ConfigError as exc:
        _print_problems(exc)
        return EXIT_USAGE
    print(f"configuration is valid: {config.source or 'embedded defaults'}")
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    from bridge.daemon import run
    from bridge.ops.logs import configure_logging

    try:
        config = _load(args)
    except ConfigError as exc:
        _print_problems(exc)
        return EXIT_USAGE
    configure_logging(config.logging.level, config.logging.format)
    try:
        return run(config)
    except BridgeError as exc:
        print(f"jmix-bridge: cannot start: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:
        print(f"jmix-bridge: cannot start: {exc}", file=sys.stderr)
        return EXIT_FAILURE


def _print_problems(exc: ConfigError) -> None:
    print(f"configuration has {len(exc.problems)} problem(s):", file=sys.stderr)
    for problem in exc.problems:
        print(f"  {problem}", file=sys.stderr)
