"""The ``iampg`` command: tokens, URLs, psql, a connection doctor, a local proxy, the emulator.

Exit codes (each command's ``--help`` lists the ones it returns):

- ``0``: success (``doctor``: every check passed; ``emulate`` and ``proxy``: stopped with
  Ctrl-C or SIGTERM).
- ``1``: the work failed: no credentials, a token could not be signed, a ``doctor`` check
  failed, the emulator or the proxy could not run.
- ``2``: usage error: bad arguments or an invalid endpoint.
- ``127``: ``psql`` was not found.
- ``130``: interrupted with Ctrl-C.

``iampg psql`` replaces itself with psql, so once psql runs the exit code is psql's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

from iampg._dsn import alembic_url, connect_params, conninfo, env, pgpass, sqlalchemy_url, url
from iampg._endpoint import Endpoint
from iampg._options import cli_spelling
from iampg._tokens import TokenProvider
from iampg.errors import ConfigurationError, Error

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILURE = 1  # the work failed (no credentials, a doctor check failed, emulator crashed …)
EXIT_USAGE = 2  # bad arguments or configuration
EXIT_NOT_FOUND = 127  # psql is not installed (the shell's "command not found")
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)

_SIGNING = "1 no AWS credentials or signing failed"
_USAGE = "2 usage error (bad arguments or endpoint)"
_INTERRUPTED = "130 interrupted (Ctrl-C)"
# What each command can return; its --help prints this line.
_EXIT_CODES: dict[str, str] = {
    "iampg": "0 success; 1 the work failed; 2 usage error; 127 psql not found; "
    "130 interrupted (Ctrl-C)",
    "token": f"0 success; {_SIGNING}; {_USAGE}; {_INTERRUPTED}",
    "url": f"0 success; {_SIGNING}; {_USAGE}; {_INTERRUPTED}",
    "env": f"0 success; {_SIGNING}; {_USAGE}; {_INTERRUPTED}",
    "psql": "psql's own once it runs (0 success, 1 error, 2 connection failed or lost, "
    f"3 script error with ON_ERROR_STOP); before that {_SIGNING}; {_USAGE}; "
    f"127 psql not found; {_INTERRUPTED}",
    "doctor": f"0 every check passed; 1 a check failed; {_USAGE}; {_INTERRUPTED}",
    "ca": "0 printed; 1 the trust store cannot be read; 2 usage error (bad arguments or "
    "endpoint, --path without an endpoint or IAMPG_SSLROOTCERT, or IAMPG_SSLROOTCERT names "
    f"a file that does not exist); {_INTERRUPTED}",
    "emulate": "0 stopped (Ctrl-C or SIGTERM); 1 the emulator could not run (backend "
    "unreachable, port busy...); 2 usage error (bad options, no PostgreSQL binaries)",
    "proxy": "0 stopped (SIGINT or SIGTERM, after the grace period); 1 the proxy could not "
    "run (port busy, no permission for the Unix socket...); 2 usage error (bad options or "
    "endpoint, missing Unix socket directory, unusable TLS files, or listening beyond "
    "loopback without client TLS and a password)",
}


def _exit_codes(command: str) -> str:
    import textwrap  # noqa: PLC0415

    return textwrap.fill(f"exit codes: {_EXIT_CODES[command]}.", width=92)


_ENDPOINT_TEXT = """\
The endpoint is a host name, a postgresql:// URL or a libpq "key=value" string; options
override it, and PGHOST, PGPORT, PGUSER, PGDATABASE, PGHOSTADDR and AWS_REGION fill what
neither gives. Credentials come from the AWS default chain (environment, profile, SSO, role)."""


def _endpoint_help(command: str) -> str:
    return f"{_ENDPOINT_TEXT}\n\n{_exit_codes(command)}"


_PSQL_HELP = f"""\
psql gets the token in PGPASSWORD and every other setting in PG* variables (PGHOST,
PGHOSTADDR, PGPORT, PGUSER, PGDATABASE, PGSSLMODE …), never on its command line, where other
users of the machine could read it. PGSERVICE and PGPASSFILE are removed from its
environment. psql's own options (-c, -f, -v, -X, -A, -t, …) go to psql; -d, -p, -U and -H
are iampg's (the token is signed for them). Arguments after "--" go to psql unchanged, e.g.
  iampg psql mydb.cluster-abc.us-east-1.rds.amazonaws.com -U app -c 'select 1'
  iampg psql mydb.cluster-abc.us-east-1.rds.amazonaws.com -U app -- -H -c 'select 1'
The token lets psql open new connections for 15 minutes; an open session outlives it.

{_endpoint_help("psql")}"""

_DOCTOR_HELP = f"""\
Checks, in order: endpoint (host, kind, region), credentials (their source; no secret is
printed), token (signing), dns, tcp, tls (certificate subject and expiry; verified with
sslmode=verify-ca/verify-full), authentication (a real connection with the token) and query
(select 1). Each prints one PASS/WARN/FAIL/SKIP line, and the fix for what failed or
warned (sslmode=require: encrypted, not authenticated; with an sslrootcert the chain is
checked, the host name not); a check whose prerequisite failed is skipped. The login needs
psycopg with a libpq: without one, authentication fails saying what to install, after the
checks before it ran. Exit code 0 when no check failed (warnings included), 1 when one failed.

{_endpoint_help("doctor")}"""

# Variables that would make libpq use another password or another server than ours.
_PSQL_DROPPED_ENV = ("PGSERVICE", "PGSERVICEFILE", "PGPASSFILE")


def _add_endpoint_arguments(
    parser: argparse.ArgumentParser, port_flags: tuple[str, ...] = ("--port", "-p")
) -> None:
    parser.add_argument("endpoint", nargs="?", help="host name, URL or key=value string")
    group = parser.add_argument_group("endpoint")
    group.add_argument("--host", "-H", help="database host name (the name that is signed)")
    group.add_argument(*port_flags, help="the database's port (default 5432)")
    group.add_argument("--user", "-U", help="database user to sign for")
    group.add_argument("--dbname", "-d", help="database name")
    group.add_argument("--region", "-r", help="AWS region (inferred from AWS host names)")
    group.add_argument("--hostaddr", help="IP address to dial instead of resolving the host")
    group.add_argument("--kind", choices=("rds", "dsql"), help="service (inferred from the host)")
    group.add_argument(
        "--sslmode",
        help="libpq sslmode (default: verify-full; require encrypts without checking the server)",
    )
    group.add_argument(
        "--sslrootcert",
        help="CA file for verify-full (default: iampg's AWS trust store, see iampg ca)",
    )
    group.add_argument("--profile", help="AWS profile to sign with")


def _add_insecure_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-insecure",
        action="store_true",
        help="allow an sslmode that may send the token unencrypted (disable, allow, prefer) "
        "to a host other than loopback",
    )


def _endpoint(args: argparse.Namespace) -> Endpoint:
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
    return Endpoint.parse(args.endpoint or "", environ=os.environ, **overrides)


def _provider(args: argparse.Namespace) -> TokenProvider:
    endpoint = _endpoint(args)
    # Refuse settings that could send the token unencrypted (unless --allow-insecure).
    connect_params(endpoint, allow_insecure=args.allow_insecure)
    return TokenProvider(endpoint, profile=args.profile)


# -- token, url, env ----------------------------------------------------------------------


def _cmd_token(args: argparse.Namespace, out: TextIO) -> int:
    out.write(_provider(args).token() + "\n")
    return EXIT_OK


def _cmd_url(args: argparse.Namespace, out: TextIO) -> int:
    provider = _provider(args)
    insecure: bool = args.allow_insecure
    formats: dict[str, Callable[[], str]] = {
        "url": lambda: url(provider=provider, allow_insecure=insecure),
        "alembic": lambda: alembic_url(
            provider=provider, driver=args.driver, allow_insecure=insecure
        ),
        "conninfo": lambda: conninfo(provider=provider, allow_insecure=insecure),
        "sqlalchemy": lambda: sqlalchemy_url(
            provider=provider, driver=args.driver, allow_insecure=insecure
        ),
        "pgpass": lambda: pgpass(provider=provider, allow_insecure=insecure),
    }
    out.write(formats[args.format]() + "\n")
    return EXIT_OK


_DOTENV_PLAIN = re.compile(r"[A-Za-z0-9_./:%&=?+@,~^-]*")


def _dotenv_value(value: str) -> str:
    """Quote a value for a ``.env`` file as python-dotenv and docker compose read it."""
    if _DOTENV_PLAIN.fullmatch(value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _cmd_env(args: argparse.Namespace, out: TextIO) -> int:
    variables = env(provider=_provider(args), allow_insecure=args.allow_insecure)
    if args.format == "json":
        out.write(json.dumps(variables, indent=2) + "\n")
    elif args.format == "dotenv":
        out.writelines(f"{name}={_dotenv_value(value)}\n" for name, value in variables.items())
    else:
        out.writelines(f"export {name}={shlex.quote(value)}\n" for name, value in variables.items())
    return EXIT_OK


# -- psql ---------------------------------------------------------------------------------


def _cmd_psql(args: argparse.Namespace, out: TextIO) -> int:  # noqa: ARG001
    program = args.psql or shutil.which("psql")
    if program is None or not os.access(program, os.X_OK):
        where = repr(args.psql) if args.psql else "on PATH"
        print(  # noqa: T201
            f"iampg psql: psql not found {where}: install the PostgreSQL client "
            "(apt install postgresql-client, brew install libpq, …) or pass --psql PATH",
            file=sys.stderr,
        )
        return EXIT_NOT_FOUND
    variables = env(provider=_provider(args), allow_insecure=args.allow_insecure)
    child_env = {k: v for k, v in os.environ.items() if k not in _PSQL_DROPPED_ENV}
    child_env.update(variables)
    argv = [program, *args.passthrough]
    sys.stdout.flush()
    sys.stderr.flush()
    if os.name == "posix":
        os.execve(program, argv, child_env)  # noqa: S606 -- psql replaces us; no shell
    # Elsewhere exec does not keep the console: run psql and let it handle Ctrl-C.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return subprocess.run(argv, env=child_env, check=False).returncode  # noqa: S603
    finally:
        signal.signal(signal.SIGINT, previous)


# -- doctor -------------------------------------------------------------------------------


def _cmd_doctor(args: argparse.Namespace, out: TextIO) -> int:
    from iampg._doctor import Doctor  # noqa: PLC0415

    if not args.timeout > 0:
        raise ConfigurationError(f"--timeout must be more than 0 seconds, not {args.timeout}")
    doctor = Doctor(
        lambda: _endpoint(args),
        profile=args.profile,
        timeout=args.timeout,
        out=None if args.json else out,
        allow_insecure=args.allow_insecure,
        preset=args.preset,
    )
    report = doctor.run()
    out.write((report.to_json() if args.json else report.summary()) + "\n")
    return EXIT_OK if report.ok else EXIT_FAILURE


# -- emulate ------------------------------------------------------------------------------


def _cmd_emulate(args: argparse.Namespace, out: TextIO) -> int:  # noqa: ARG001
    from iampg.emulator import _cli  # noqa: PLC0415 -- needs the emulator extra

    return _cli.run(args)


def _missing_emulator(args: argparse.Namespace, out: TextIO) -> int:  # noqa: ARG001
    raise ConfigurationError("the emulator needs extra packages: pip install 'iampg[emulator]'")


# -- proxy --------------------------------------------------------------------------------


def _cmd_proxy(args: argparse.Namespace, out: TextIO) -> int:
    from iampg.proxy import _cli  # noqa: PLC0415

    return _cli.run(args, out)


_PROXY_HELP = f"""\
Listen on 127.0.0.1 (a free port unless --port) and give every client that connects its own
session to the endpoint, logged in with a fresh IAM token: GUI tools, migration tools and
clients in any language connect without knowing about IAM. The first line on standard output
is the local connection string (no password), one line per endpoint:
  iampg proxy mydb.cluster-abc.us-east-1.rds.amazonaws.com -U app --port 6432
  psql "host=127.0.0.1 port=6432 user=app dbname=app"
Several endpoints: repeat --endpoint URL (one local port each, --port N gives N, N+1, ...).
The endpoint's port is --upstream-port here (--port is the local one).
Beyond loopback (--listen 0.0.0.0) clients must use TLS (--tls-cert/--tls-key or
--tls-generate) and a SCRAM-SHA-256 password (--password-file FILE or $IAMPG_PROXY_PASSWORD,
never on the command line); without both the proxy refuses to start.
One log line per session on stderr (--log-format json for JSON); no token or password.
SIGINT/SIGTERM: stop accepting, let open sessions run for --grace seconds, then close them.

{_endpoint_help("proxy")}"""


# -- ca -----------------------------------------------------------------------------------


def _cmd_ca(args: argparse.Namespace, out: TextIO) -> int:
    from iampg import _trust  # noqa: PLC0415

    if not (args.endpoint or args.host or os.environ.get("PGHOST")):
        override = _trust.override()
        if args.path:
            if override is None:  # the file depends on the endpoint
                raise ConfigurationError(
                    "--path prints the CA file an endpoint uses: name the endpoint (or set "
                    "PGHOST); `iampg ca` without --path shows the whole trust store"
                )
            out.write(f"{override}\n")  # IAMPG_SSLROOTCERT: the file for every endpoint
            return EXIT_OK
        lines = _trust.report()
        if override:
            lines.append(f"{_trust.ENV_VAR}={override}: used instead of the files above")
        out.write("".join(f"{line}\n" for line in lines))
        return EXIT_OK
    if args.user is None:  # the CA file does not depend on the user: do not require one
        args.user = "postgres"
    endpoint = _endpoint(args)
    given = endpoint.params.get("sslrootcert")
    path = given or str(_trust.root_file(endpoint))
    if args.path:
        out.write(f"{path}\n")
        return EXIT_OK
    source = (
        "sslrootcert given" if given else _trust.ENV_VAR if os.environ.get(_trust.ENV_VAR) else ""
    )
    summary = _trust.describe(path) or f"not one of iampg's files ({source})"
    out.write(f"{path}\n{summary}\n")
    return EXIT_OK


# -- the parser ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iampg",
        description="IAM-authenticated PostgreSQL on AWS: tokens, URLs, psql, a connection "
        "doctor, and a local emulator.",
        epilog=_exit_codes("iampg"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"iampg {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str, description: str, epilog: str) -> Any:
        return sub.add_parser(
            name,
            help=help_text,
            description=description,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            allow_abbrev=False,  # psql's options must not pass for abbreviations of ours
        )

    token = command(
        "token",
        "print an IAM authentication token",
        "Print a token for the endpoint; it is valid for 15 minutes.",
        _endpoint_help("token"),
    )
    _add_endpoint_arguments(token)
    _add_insecure_argument(token)
    token.set_defaults(func=_cmd_token)

    url_parser = command(
        "url",
        "print a connection URL with a token, percent-encoded",
        "Print a postgresql:// URL (or another connection string) carrying a token, for "
        "tools that take one. The output is a credential valid for 15 minutes.",
        _endpoint_help("url"),
    )
    _add_endpoint_arguments(url_parser)
    _add_insecure_argument(url_parser)
    url_parser.add_argument(
        "--format",
        choices=("url", "alembic", "conninfo", "sqlalchemy", "pgpass"),
        default="url",
        help="url (default): postgresql://, token percent-encoded; alembic: the sqlalchemy "
        "url with %% doubled for alembic.ini/ConfigParser; conninfo: libpq key=value; "
        "sqlalchemy: postgresql+DRIVER://; pgpass: a host:port:dbname:user:token line",
    )
    url_parser.add_argument(
        "--driver",
        default="psycopg",
        help="SQLAlchemy driver for --format sqlalchemy (default: %(default)s)",
    )
    url_parser.set_defaults(func=_cmd_url)

    env_parser = command(
        "env",
        "print shell export lines for PG* variables with a token",
        'Print `export PGHOST=… PGPASSWORD=<token> …` lines: eval "$(iampg env ...)" and '
        "run any libpq tool. The output is a credential valid for 15 minutes.",
        _endpoint_help("env"),
    )
    _add_endpoint_arguments(env_parser)
    _add_insecure_argument(env_parser)
    env_parser.add_argument(
        "--format",
        choices=("shell", "dotenv", "json"),
        default="shell",
        help="shell (default): POSIX export lines; dotenv: NAME=value lines for .env files; "
        "json: an object",
    )
    env_parser.set_defaults(func=_cmd_env)

    psql = command(
        "psql",
        "run psql with a token in its environment",
        "Run psql against the endpoint with a fresh token in PGPASSWORD.",
        _PSQL_HELP,
    )
    _add_endpoint_arguments(psql)
    _add_insecure_argument(psql)
    psql.add_argument("--psql", metavar="PATH", help="the psql program (default: psql on PATH)")
    psql.set_defaults(func=_cmd_psql)

    doctor = command(
        "doctor",
        "check credentials, network, TLS and login step by step",
        "Diagnose a connection: print one line per check and the fix for what failed.",
        _DOCTOR_HELP,
    )
    _add_endpoint_arguments(doctor)
    _add_insecure_argument(doctor)
    doctor.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="time limit of each network check (default: %(default)s)",
    )
    doctor.add_argument("--json", action="store_true", help="print one JSON report instead")
    doctor.add_argument(
        "--preset",
        type=_preset,
        metavar="{rds,aurora-serverless,aurora-express,dsql}",
        help="the service's connection defaults (connect timeout, waiting for a paused "
        "cluster); default: dsql for DSQL hosts, else rds",
    )
    doctor.set_defaults(func=_cmd_doctor)

    emulate = command(
        "emulate",
        "run the local IAM emulator in front of a real PostgreSQL",
        "Run a PostgreSQL gateway that checks IAM tokens like RDS/Aurora does, in front of a "
        "real PostgreSQL (a DSN, or a throwaway cluster). Stop it with Ctrl-C.",
        _exit_codes("emulate"),
    )
    try:
        from iampg.emulator import _cli  # noqa: PLC0415
    except ImportError:
        emulate.set_defaults(func=_missing_emulator)
    else:
        _cli.add_arguments(emulate)
        emulate.set_defaults(func=_cmd_emulate)

    proxy = command(
        "proxy",
        "run a local proxy: any client, IAM-authenticated sessions",
        "Run a local PostgreSQL endpoint that logs every client in to the IAM endpoint with "
        "a fresh token. Stop it with Ctrl-C or SIGTERM.",
        _PROXY_HELP,
    )
    _add_endpoint_arguments(proxy, ("--upstream-port",))
    _add_insecure_argument(proxy)
    from iampg.proxy import _cli as proxy_cli  # noqa: PLC0415

    proxy_cli.add_arguments(proxy)
    proxy.set_defaults(func=_cmd_proxy)

    ca = command(
        "ca",
        "show the shipped AWS trust store, or the CA file an endpoint uses",
        "Without an endpoint (no argument, --host or PGHOST): print where iampg's AWS trust "
        "store is, when it was built and what it holds. With one: print the CA file "
        "(sslrootcert) its connections verify the server with, and what that file is. "
        "IAMPG_SSLROOTCERT=FILE replaces the store.",
        _endpoint_help("ca"),
    )
    _add_endpoint_arguments(ca)
    ca.add_argument(
        "--path",
        action="store_true",
        help="print only the path of the CA file that would be used: an sslrootcert given "
        "(--sslrootcert, PGSSLROOTCERT), else the file IAMPG_SSLROOTCERT names, else the "
        "store's file for the endpoint; without an endpoint, IAMPG_SSLROOTCERT's file, or a "
        "usage error (exit 2) when it is not set",
    )
    ca.set_defaults(func=_cmd_ca)
    return parser


def _version() -> str:
    from iampg import __version__  # noqa: PLC0415

    return __version__


def _preset(value: str) -> str:
    """Return the canonical preset name for argparse, or refuse it as argparse does."""
    from iampg._defaults import canonical_preset  # noqa: PLC0415

    try:
        return canonical_preset(value)
    except ConfigurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# psql's own options (psql 12 to 17), so that `iampg psql HOST -c 'select 1'` reaches psql.
# Its connection options -h, -p, -U, -d are iampg's: the token is signed for them.
_PSQL_SHORT_VALUE = frozenset("cfvLoFPRT")
_PSQL_SHORT_FLAG = frozenset("lVX1abeEnqsSAtxz0wW")
_PSQL_LONG_VALUE = frozenset(
    {
        "--command",
        "--file",
        "--set",
        "--variable",
        "--log-file",
        "--output",
        "--field-separator",
        "--pset",
        "--record-separator",
        "--table-attr",
    }
)
_PSQL_LONG_FLAG = frozenset(
    {
        "--list",
        "--version",
        "--no-psqlrc",
        "--single-transaction",
        "--echo-all",
        "--echo-errors",
        "--echo-queries",
        "--echo-hidden",
        "--no-readline",
        "--quiet",
        "--single-step",
        "--single-line",
        "--no-align",
        "--csv",
        "--html",
        "--tuples-only",
        "--expanded",
        "--field-separator-zero",
        "--record-separator-zero",
        "--no-password",
        "--password",
    }
)


class _UsageError(Exception):
    """A command line that cannot be split unambiguously; the message says what to do."""


def _split_psql(arguments: list[str], ours: argparse.ArgumentParser) -> tuple[list[str], list[str]]:
    """Split ``iampg psql`` arguments into iampg's and psql's own options, keeping order.

    Raises:
        _UsageError: An option neither iampg nor psql knows, or a cluster mixing both.
    """
    takes_value = {
        flag: action.nargs != 0
        for action in ours._actions  # noqa: SLF001 -- argparse has no public list
        for flag in action.option_strings
    }
    mine: list[str] = []
    psql: list[str] = []
    rest = iter(arguments)
    for arg in rest:
        name = arg.partition("=")[0] if arg.startswith("--") else arg[:2]
        if not arg.startswith("-") or arg == "-":
            mine.append(arg)
        elif name in takes_value:
            attached = "=" in arg if arg.startswith("--") else len(arg) > 2  # noqa: PLR2004
            mine.append(arg)
            if takes_value[name] and not attached:
                mine.extend(_next(rest))
        elif arg.startswith("--"):
            if name not in _PSQL_LONG_VALUE | _PSQL_LONG_FLAG:
                raise _UsageError(f"unknown option {name}: put psql's options after --")
            psql.append(arg)
            if name in _PSQL_LONG_VALUE and "=" not in arg:
                psql.extend(_next(rest))
        else:
            psql.extend(_psql_short(arg, rest))
    return mine, psql


def _psql_short(arg: str, rest: Iterator[str]) -> list[str]:
    """Return psql's short options ``arg`` (``-tAc``) and the value its last one takes."""
    for i, char in enumerate(arg[1:], start=1):
        if char in _PSQL_SHORT_VALUE:  # the rest of the cluster, or the next argument
            return [arg, *_next(rest)] if i == len(arg) - 1 else [arg]
        if char not in _PSQL_SHORT_FLAG:
            raise _UsageError(
                f"unknown option -{char} in {arg}: give iampg's options separately, "
                "and put other psql options after --"
            )
    return [arg]


def _next(rest: Iterator[str]) -> list[str]:
    """Return the next argument as a list, or none at the end (argparse or psql complains)."""
    return [arg for arg in [next(rest, None)] if arg is not None]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``iampg`` command and return its exit code (see the module docstring)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if "--" in arguments:
        cut = arguments.index("--")
        arguments, passthrough = arguments[:cut], arguments[cut + 1 :]
    try:
        parser = _parser()
        command = next((arg for arg in arguments if not arg.startswith("-")), None)
        if command == "psql":
            at = arguments.index("psql") + 1
            try:
                mine, psql_options = _split_psql(arguments[at:], _subparser(parser, "psql"))
            except _UsageError as exc:
                print(f"iampg psql: {exc}", file=sys.stderr)  # noqa: T201
                return EXIT_USAGE
            arguments = [*arguments[:at], *mine]
            passthrough = [*psql_options, *passthrough]
        try:
            args = parser.parse_args(arguments)
        except SystemExit as exc:  # --help, --version, or a usage error already printed
            return exc.code if isinstance(exc.code, int) else EXIT_USAGE
        if passthrough and args.command != "psql":
            print(  # noqa: T201
                f"iampg {args.command}: only psql takes arguments after --", file=sys.stderr
            )
            return EXIT_USAGE
        args.passthrough = passthrough
        func: Callable[[argparse.Namespace, TextIO], int] = args.func
        with cli_spelling():  # messages name --options and variables, not Python keywords
            return _run(func, args)
    except KeyboardInterrupt:
        print("iampg: interrupted", file=sys.stderr)  # noqa: T201
        return EXIT_INTERRUPTED


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:  # noqa: SLF001 -- argparse has no public lookup
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            found: argparse.ArgumentParser = action.choices[name]
            return found
    raise LookupError(name)


def _run(func: Callable[[argparse.Namespace, TextIO], int], args: argparse.Namespace) -> int:
    """Run a command; report iampg's and the system's errors in one line, without traceback."""
    try:
        return func(args, sys.stdout)
    except ConfigurationError as exc:
        print(f"iampg {args.command}: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_USAGE
    except Error as exc:
        print(f"iampg {args.command}: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_FAILURE
    except BrokenPipeError:
        # The reader went away (`iampg env | head -1`): not worth a message.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_FAILURE
    except Exception as exc:
        if not isinstance(exc, (OSError, *_driver_errors())):
            raise
        print(f"iampg {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_FAILURE


def _driver_errors() -> tuple[type[Exception], ...]:
    """Return psycopg's base error if psycopg was loaded (a command that connects loads it)."""
    psycopg = sys.modules.get("psycopg")
    error = getattr(psycopg, "Error", None)
    return (error,) if isinstance(error, type) and issubclass(error, Exception) else ()


if __name__ == "__main__":
    sys.exit(main())
