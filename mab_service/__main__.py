"""Command line: ``mab-service serve``. Builds Settings, then runs uvicorn with uvloop and httptools."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import fields

from mab_service import __version__, config

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
    docs = _field_docs()
    for f in fields(config.Settings):
        flag = "--" + f.name.replace("_", "-")
        env = config.ENV_PREFIX + f.name.upper()
        help_text = f"{docs.get(f.name, '')} [env {env}]"
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            serve.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            serve.add_argument(flag, type=type(default), default=None, metavar=f.name.upper(), help=help_text)
    return parser


def _field_docs() -> dict[str, str]:
    # The attribute docstrings in config.py, so that --help and the code say the same thing.
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(config.Settings))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
                docs[node.target.id] = str(following.value.value)
    return docs


def serve(settings: config.Settings) -> None:
    import uvicorn

    # Workers are separate processes that rebuild the settings from the environment.
    settings.export_env(os.environ)
    uvicorn.run(
        "mab_service.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=settings.access_log,
        log_level=settings.log_level,
        timeout_keep_alive=int(settings.timeout_keep_alive_s),
        server_header=False,
        proxy_headers=settings.proxy_headers,
    )


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {f.name: getattr(args, f.name) for f in fields(config.Settings)}
    try:
        settings = config.Settings.from_env(os.environ, **overrides)
    except config.SettingsError as exc:
        print(f"mab-service: {exc}", file=sys.stderr)
        sys.exit(STARTUP_FAILURE)
    if args.command == "serve":
        serve(settings)


if __name__ == "__main__":
    main()
