"""Command line: ``mab-service serve`` builds Settings and serves (server.py); ``mab-service health`` probes it."""

from __future__ import annotations

import argparse
import logging.config
import os
import sys
import urllib.error
import urllib.request
from dataclasses import fields

from mab_service import __version__, config, logs

STARTUP_FAILURE = 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mab-service",
        description="Thompson-sampling recommendation service.",
        epilog="Every option can also be set as an environment variable MAB_<OPTION> (e.g. MAB_PORT=9000); "
        "a flag wins over the variable, the variable over the default.",
    )
    parser.add_argument("--version", action="version", version=f"mab-service {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the HTTP service",
        description="Run the HTTP service. Each option also reads MAB_<OPTION> from the environment.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    defaults = config.Settings()
    for f in fields(config.Settings):
        flag = "--" + f.name.replace("_", "-")
        env = config.ENV_PREFIX + f.name.upper()
        help_text = f"{f.metadata['help']} [env {env}]".replace("%", "%%")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            serve.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            serve.add_argument(flag, type=type(default), default=None, metavar=f.name.upper(), help=help_text)
    health = commands.add_parser(
        "health",
        help="probe /health of the service on this host (exit status 0 if ready, 1 if not)",
        description="GET /health at the configured host and port (MAB_HOST, MAB_PORT; loopback for a wildcard "
        "host); for container health checks.",
    )
    health.add_argument("--port", type=int, default=None, help="port to probe [env MAB_PORT]")
    health.add_argument("--timeout-s", type=float, default=2.0, help="seconds to wait for the answer")
    commands.add_parser("setup", help="create the fleet's Pub/Sub topic, subscription and Bigtable table")
    commands.add_parser("learn", help="apply the fleet's events from Pub/Sub to Bigtable")
    return parser


def probe(settings: config.Settings, timeout_s: float) -> bool:
    """Whether GET /health at ``settings.host`` (loopback if it is a wildcard) and ``settings.port`` answers 200."""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    url = f"http://{f'[{host}]' if ':' in host else host}:{settings.port}/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as answer:
            return bool(answer.status == 200)
    except (urllib.error.URLError, OSError):  # HTTPError (a 503) is a URLError
        return False


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["setup"], ["learn"]):  # the fleet's commands parse their own flags
        from mab_service.fleet import cli

        sys.exit(cli.main(argv))
    args = _parser().parse_args(argv)
    overrides = {f.name: getattr(args, f.name, None) for f in fields(config.Settings)}
    try:
        settings = config.Settings.from_env(os.environ, **overrides)
    except config.SettingsError as exc:
        print(f"mab-service: {exc}", file=sys.stderr)
        sys.exit(STARTUP_FAILURE)
    if args.command == "health":
        sys.exit(0 if probe(settings, args.timeout_s) else 1)
    logging.config.dictConfig(logs.log_config(settings))
    if args.command == "serve":
        # Imported here: nothing that reads the metrics directory may be imported before serve() exports it.
        from mab_service import server

        server.serve(settings)


if __name__ == "__main__":
    main()
