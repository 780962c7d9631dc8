"""The ``iampg`` command: print tokens, URLs and environments, or run the local emulator."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from iampg._dsn import conninfo, env, url
from iampg._endpoint import Endpoint
from iampg._tokens import TokenProvider
from iampg.errors import ConfigurationError, Error

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILURE = 1  # the work failed (no credentials, emulator crashed …)
EXIT_USAGE = 2  # bad arguments or configuration
EXIT_INTERRUPTED = 130

_ENDPOINT_HELP = """\
The endpoint is a host name, a postgresql:// URL or a libpq "key=value" string; options
override it, and PGHOST, PGPORT, PGUSER, PGDATABASE, PGHOSTADDR and AWS_REGION fill what
neither gives. Credentials come from the AWS default chain (environment, profile, SSO, role)."""


def _add_endpoint_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("endpoint", nargs="?", help="host name, URL or key=value string")
    group = parser.add_argument_group("endpoint")
    group.add_argument("--host", "-H", help="database host name (the name that is signed)")
    group.add_argument("--port", "-p", help="port (default 5432)")
    group.add_argument("--user", "-U", help="database user to sign for")
    group.add_argument("--dbname", "-d", help="database name")
    group.add_argument("--region", "-r", help="AWS region (inferred from AWS host names)")
    group.add_argument("--hostaddr", help="IP address to dial instead of resolving the host")
    group.add_argument("--kind", choices=("rds", "dsql"), help="service (inferred from the host)")
    group.add_argument("--sslmode", help="libpq sslmode (default: require; DSQL verify-full)")
    group.add_argument("--sslrootcert", help="CA file for sslmode=verify-full")
    group.add_argument("--profile", help="AWS profile to sign with")


def _provider(args: argparse.Namespace) -> TokenProvider:
    overrides: dict[str, Any] = {
        "host": args.host,
        "port": args.port,
        "user": args.user,
        "dbname": args.dbname,
        "region": args.region,
        "hostaddr": args.hostaddr,
        "kind": args.kind,
        "sslmode": args.sslmode,
        "sslrootcert": args.sslrootcert,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    endpoint = Endpoint.parse(args.endpoint or "", environ=os.environ, **overrides)
    return TokenProvider(endpoint, profile=args.profile)


def _cmd_token(args: argparse.Namespace, out: TextIO) -> int:
    out.write(_provider(args).token() + "\n")
    return EXIT_OK


def _cmd_url(args: argparse.Namespace, out: TextIO) -> int:
    provider = _provider(args)
    if args.format == "conninfo":
        out.write(conninfo(provider=provider) + "\n")
        return EXIT_OK
    text = url(provider=provider)
    if args.format == "alembic":
        text = text.replace("%", "%%")
    out.write(text + "\n")
    return EXIT_OK


def _cmd_env(args: argparse.Namespace, out: TextIO) -> int:
    out.writelines(
        f"export {name}={shlex.quote(value)}\n"
        for name, value in env(provider=_provider(args)).items()
    )
    return EXIT_OK


def _cmd_emulate(args: argparse.Namespace, out: TextIO) -> int:  # noqa: ARG001
    from iampg.emulator import _cli  # noqa: PLC0415 -- needs the emulator extra

    return _cli.run(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iampg",
        description="IAM-authenticated PostgreSQL on AWS: tokens, URLs, and a local emulator.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    token = sub.add_parser(
        "token",
        help="print an IAM authentication token",
        description="Print a token for the endpoint; it is valid for 15 minutes.",
        epilog=_ENDPOINT_HELP,
    )
    _add_endpoint_arguments(token)
    token.set_defaults(func=_cmd_token)

    url_parser = sub.add_parser(
        "url",
        help="print a connection URL with a token, percent-encoded",
        description="Print a postgresql:// URL (or conninfo) carrying a token, for tools that "
        "take a connection string. The output is a credential valid for 15 minutes.",
        epilog=_ENDPOINT_HELP,
    )
    _add_endpoint_arguments(url_parser)
    url_parser.add_argument(
        "--format",
        choices=("url", "alembic", "conninfo"),
        default="url",
        help="url (default); alembic: %% doubled for alembic.ini/ConfigParser; conninfo: libpq",
    )
    url_parser.set_defaults(func=_cmd_url)

    env_parser = sub.add_parser(
        "env",
        help="print shell export lines for PG* variables with a token",
        description="Print `export PGHOST=… PGPASSWORD=<token> …` lines: "
        'eval "$(iampg env ...)" and run any libpq tool.',
        epilog=_ENDPOINT_HELP,
    )
    _add_endpoint_arguments(env_parser)
    env_parser.set_defaults(func=_cmd_env)

    emulate = sub.add_parser(
        "emulate",
        help="run the local IAM emulator in front of a real PostgreSQL",
        description="Run a PostgreSQL gateway that checks IAM tokens like RDS/Aurora does, in "
        "front of a real PostgreSQL (a DSN, or a throwaway cluster). Stop it with Ctrl-C.",
    )
    try:
        from iampg.emulator import _cli  # noqa: PLC0415
    except ImportError:
        emulate.set_defaults(func=_missing_emulator)
    else:
        _cli.add_arguments(emulate)
        emulate.set_defaults(func=_cmd_emulate)
    return parser


def _missing_emulator(args: argparse.Namespace, out: TextIO) -> int:  # noqa: ARG001
    raise ConfigurationError("the emulator needs extra packages: pip install 'iampg[emulator]'")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``iampg`` command and return its exit code."""
    args = _parser().parse_args(argv)
    func: Callable[[argparse.Namespace, TextIO], int] = args.func
    try:
        return func(args, sys.stdout)
    except ConfigurationError as exc:
        print(f"iampg {args.command}: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_USAGE
    except Error as exc:
        print(f"iampg {args.command}: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
