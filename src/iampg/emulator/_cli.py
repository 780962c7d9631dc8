"""The ``iampg emulate`` command: run the emulator in front of a PostgreSQL backend."""

from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import socket
import sys
import threading
import warnings
from typing import TYPE_CHECKING, Any, Protocol

from iampg.emulator._backend import Backend, find_bindir
from iampg.emulator._dsql_sql import DsqlRules
from iampg.errors import ConfigurationError, Error

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Mapping
    from pathlib import Path
    from types import FrameType

__all__ = ["add_arguments", "run"]

_PROG = "iampg emulate"
_EXIT_OK = 0
_EXIT_RUNTIME = 1
_EXIT_USAGE = 2
_PRESETS = "{rds,aurora-serverless,aurora-express,dsql}"
_WAIT_SLICE = 0.5  # seconds; the main thread wakes this often while waiting for a signal
_DSQL_RULES = tuple(field.name for field in dataclasses.fields(DsqlRules))
#: ``--dsql-off`` groups: every refusal of a statement, and everything.
_DSQL_GROUPS = {
    "sql": tuple(
        name for name in _DSQL_RULES if name not in ("transaction_limits", "occ", "role_mapping")
    ),
    "all": _DSQL_RULES,
}


class _Credentials(Protocol):
    @property
    def access_key_id(self) -> str: ...
    @property
    def secret_access_key(self) -> str: ...
    @property
    def session_token(self) -> str | None: ...


class _Stoppable(Protocol):
    def stop(self) -> None: ...


class _Emulator(Protocol):
    """What ``run`` needs of :class:`iampg.emulator.Emulator`."""

    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def listen_host(self) -> str: ...
    @property
    def region(self) -> str: ...
    @property
    def ca_file(self) -> Path: ...
    @property
    def credentials(self) -> _Credentials: ...

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def aws_env(self) -> Mapping[str, str]: ...
    def conninfo(self, user: str, dbname: str = ...) -> str: ...


def _load_emulator() -> Callable[..., _Emulator]:
    """Return the Emulator class (imported late: it needs the ``emulator`` extra)."""
    try:
        from iampg.emulator import Emulator  # noqa: PLC0415 - optional dependencies
    except ImportError as exc:  # the message names the extra to install
        raise ConfigurationError(str(exc)) from exc
    factory: Callable[..., _Emulator] = Emulator
    return factory


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``iampg emulate`` options to *parser*.

    Args:
        parser: The subcommand's parser.
    """
    parser.add_argument(
        "--backend",
        metavar="DSN",
        default=None,
        help="PostgreSQL server to relay sessions to, as a libpq DSN or URL for a user that "
        "may create roles (default: $IAMPG_EMULATOR_BACKEND, else a temporary cluster "
        "started from the PostgreSQL binaries on this machine)",
    )
    parser.add_argument(
        "--host",
        metavar="NAME",
        action="append",
        dest="hosts",
        default=None,
        help="host name clients sign tokens for and verify the certificate against; "
        "repeat for more names (default: the emulator's)",
    )
    parser.add_argument("--region", default=None, help="AWS region (default: the emulator's)")
    parser.add_argument(
        "--listen",
        metavar="ADDRESS",
        default="127.0.0.1",
        help="address to listen on (default: %(default)s)",
    )
    parser.add_argument(
        "--port", type=int, default=0, help="port to listen on (default: a free one, printed)"
    )
    parser.add_argument(
        "--time-scale",
        type=float,
        default=None,
        metavar="FACTOR",
        help="speed of the emulator's clock relative to real time (default: 1.0)",
    )
    parser.add_argument(
        "--preset",
        type=_preset,
        metavar=_PRESETS,
        default=None,
        help="the service to behave like: rds (tokens only; the default), aurora-serverless "
        "or its other name aurora-express (auto-pause, ~16 s resume, ~3.5 s connect latency, "
        "5-minute idle cut) or dsql (DSQL tokens and host name, SNI required, 1-hour "
        "session cap, connection limits)",
    )
    parser.add_argument(
        "--profile",
        type=_preset,
        metavar="PRESET",
        dest="old_profile",
        default=None,
        help="deprecated name of --preset",
    )
    parser.add_argument(
        "--user",
        default=None,
        help="database user to create on the backend if missing "
        "(default: admin with --preset dsql, else postgres)",
    )
    parser.add_argument(
        "--dbname", default="postgres", help="database for the examples (default: %(default)s)"
    )
    parser.add_argument(
        "--advertise-port",
        type=int,
        metavar="PORT",
        default=None,
        help="port tokens are signed for, when clients reach the emulator through a tunnel "
        "or forwarded port other than --port (default: the listening port; RDS only)",
    )
    parser.add_argument(
        "--loopback-names",
        action="store_true",
        help="also name localhost, 127.0.0.1 and ::1 in the certificate (default: the host "
        "names only, as a production endpoint's certificate)",
    )
    parser.add_argument(
        "--no-rds-iam",
        dest="require_rds_iam",
        action="store_false",
        help="accept tokens for database users not granted rds_iam (RDS refuses them)",
    )
    parser.add_argument(
        "--dsql-off",
        type=_dsql_off,
        action="extend",
        metavar="RULE[,RULE...]",
        default=None,
        help="with --preset dsql: turn DSQL rules off, comma-separated or repeated: sql "
        "(every refusal of a statement), transaction-limits, occ (optimistic concurrency), "
        "role-mapping, all, or one refusal: "
        + ", ".join(_flag(name) for name in _DSQL_GROUPS["sql"]),
    )
    parser.add_argument(
        "--max-unauthenticated",
        type=int,
        metavar="N",
        default=None,
        help="connections that may be open without having authenticated; one more is refused "
        "with 53300 (default: 256)",
    )
    parser.add_argument(
        "--tls-timeout",
        type=float,
        metavar="SECONDS",
        default=None,
        help="seconds a connection has from being accepted to finishing TLS (default: 10)",
    )
    parser.add_argument(
        "--auth-timeout",
        type=float,
        metavar="SECONDS",
        default=None,
        help="seconds a connection has from being accepted to being authenticated, as "
        "PostgreSQL's authentication_timeout (default: 60)",
    )


def _preset(value: str) -> str:
    """Return the canonical preset for argparse (every spelling), or refuse it like argparse."""
    import argparse  # noqa: PLC0415

    from iampg._defaults import canonical_preset  # noqa: PLC0415

    try:
        return canonical_preset(value)
    except ConfigurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _flag(rule: str) -> str:
    """Return how ``--dsql-off`` spells a :class:`DsqlRules` field."""
    return rule.replace("_", "-")


def _dsql_off(value: str) -> list[str]:
    """Return the :class:`DsqlRules` fields ``--dsql-off`` names, or refuse like argparse."""
    import argparse  # noqa: PLC0415

    rules: list[str] = []
    for word in value.split(","):
        name = word.strip().lower().replace("-", "_")
        if name in _DSQL_GROUPS:
            rules.extend(_DSQL_GROUPS[name])
        elif name in _DSQL_RULES:
            rules.append(name)
        else:
            choices = ", ".join(map(_flag, [*_DSQL_GROUPS, *_DSQL_RULES]))
            raise argparse.ArgumentTypeError(f"unknown DSQL rule {word!r} (choose from {choices})")
    return rules


def _dsql_rules(args: argparse.Namespace) -> DsqlRules | None:
    """Return the rules ``--dsql-off`` leaves on, or None without it.

    Raises:
        iampg.ConfigurationError: ``--dsql-off`` without ``--preset dsql``.
    """
    off = getattr(args, "dsql_off", None)
    if not off:
        return None
    if _chosen_preset(args) != "dsql":
        raise ConfigurationError(
            "--dsql-off applies to --preset dsql only: the RDS presets refuse no statement"
        )
    return DsqlRules().replace(**dict.fromkeys(off, False))


def _chosen_preset(args: argparse.Namespace) -> str | None:
    """Return ``--preset``, or the deprecated ``--profile`` with a note on stderr."""
    old = getattr(args, "old_profile", None)
    if old is None:
        return getattr(args, "preset", None)
    if getattr(args, "preset", None) not in {None, old}:
        raise ConfigurationError("give --preset, not also its old name --profile")
    sys.stderr.write(f"{_PROG}: --profile is deprecated: use --preset {old}\n")
    sys.stderr.flush()
    args.preset, args.old_profile = old, None
    return str(old)


def _say(text: str) -> None:
    """Write *text* and a newline to stdout at once (it may be a pipe)."""
    sys.stdout.write(f"{text}\n")
    sys.stdout.flush()


def _error(message: str) -> None:
    """Write one line to stderr."""
    sys.stderr.write(f"{_PROG}: error: {message}\n")
    sys.stderr.flush()


def _open_backend(dsn: str | None) -> Backend:
    """Return the backend the options ask for."""
    dsn = dsn or os.environ.get("IAMPG_EMULATOR_BACKEND") or None
    if dsn is not None:
        return Backend.from_dsn(dsn)
    bindir = find_bindir()
    _say(f"starting a temporary PostgreSQL cluster ({bindir})...")
    return Backend.temporary(bindir=bindir)


def _emulator_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Return the Emulator keyword arguments the options set (others keep its defaults)."""
    kwargs: dict[str, Any] = {"listen_host": args.listen, "port": args.port}
    if args.hosts:
        kwargs["hostnames"] = tuple(args.hosts)
    if args.region:
        kwargs["region"] = args.region
    if args.time_scale is not None:
        kwargs["time_scale"] = args.time_scale
    preset = _chosen_preset(args)
    if preset:
        kwargs["preset"] = preset
    for name in (
        "advertise_port",
        "max_unauthenticated",
        "tls_timeout",
        "auth_timeout",
    ):
        value = getattr(args, name, None)
        if value is not None:
            kwargs[name] = value
    if getattr(args, "loopback_names", False):
        kwargs["loopback_names"] = True
    if not getattr(args, "require_rds_iam", True):
        kwargs["require_rds_iam"] = False
    rules = _dsql_rules(args)
    if rules is not None:
        kwargs["dsql_rules"] = rules
    return kwargs


def _user(args: argparse.Namespace) -> str:
    """Return the database user: ``--user``, else the service's usual one."""
    if args.user:
        return str(args.user)
    return "admin" if _chosen_preset(args) == "dsql" else "postgres"


def _behaviour(emu: _Emulator) -> list[str]:
    """Return the banner lines describing the emulator's preset (none for a stand-in)."""
    preset = getattr(emu, "preset", None)
    if preset is None:
        return []
    lines = preset.describe()
    rules: DsqlRules | None = getattr(emu, "dsql_rules", None)
    if rules is not None and rules != DsqlRules():
        off = [_flag(name) for name in _DSQL_RULES if not getattr(rules, name)]
        lines = [*lines, f"DSQL rules off: {', '.join(off)}"]
    return [f"  preset:     {preset.name}", *(f"              {line}" for line in lines)]


def _token_command(emu: _Emulator, user: str) -> str:
    """Return the AWS CLI command that mints a token for ``user``."""
    q = shlex.quote
    if getattr(emu, "service", "rds") == "dsql":
        verb = (
            "generate-db-connect-admin-auth-token"
            if user == "admin"
            else ("generate-db-connect-auth-token")
        )
        return f"aws dsql {verb} --hostname {q(emu.host)} --region {q(emu.region)}"
    return (
        f"aws rds generate-db-auth-token --hostname {q(emu.host)} --port {_signed_port(emu)} "
        f"--region {q(emu.region)} --username {q(user)}"
    )


def _signed_port(emu: _Emulator) -> int:
    """Return the port tokens are signed for: ``--advertise-port``, else the listening one."""
    advertised: int | None = getattr(emu, "advertise_port", None)
    return advertised or emu.port


def _describe_backend(backend: Backend) -> str:
    """Describe the backend in one line, without its password."""
    if backend.kind == "temporary":
        return f"temporary cluster at {backend.host}:{backend.port} (deleted on stop)"
    return f"{backend.host}:{backend.port} user={backend.user} dbname={backend.dbname}"


def _exports(emu: _Emulator, user: str, dbname: str) -> dict[str, str]:
    """Return the variables that point libpq, botocore and iampg at the emulator."""
    ca_file = str(emu.ca_file)
    env = {
        "PGHOST": emu.host,
        "PGHOSTADDR": emu.listen_host,
        "PGPORT": str(_signed_port(emu)),
        "PGUSER": user,
        "PGDATABASE": dbname,
        "PGSSLMODE": "verify-full",
        "PGSSLROOTCERT": ca_file,
        "IAMPG_SSLROOTCERT": ca_file,  # iampg's default CA file: the emulator's
    }
    env.update(emu.aws_env())
    env.setdefault("AWS_ACCESS_KEY_ID", emu.credentials.access_key_id)
    env.setdefault("AWS_SECRET_ACCESS_KEY", emu.credentials.secret_access_key)
    if emu.credentials.session_token:
        env.setdefault("AWS_SESSION_TOKEN", emu.credentials.session_token)
    env.setdefault("AWS_REGION", emu.region)
    return env


def _banner(emu: _Emulator, backend: Backend, user: str, dbname: str) -> str:
    """Return what to print once the emulator runs: where it is and how to connect."""
    q = shlex.quote
    env = _exports(emu, user, dbname)
    # Keys from another source would win over the exported ones, or break them.
    unset = ["AWS_PROFILE", "PGSERVICE", "PGPASSWORD"]
    if "AWS_SESSION_TOKEN" not in env:
        unset.insert(0, "AWS_SESSION_TOKEN")
    conninfo = emu.conninfo(user, dbname=dbname)
    token = _token_command(emu, user)
    lines = [
        "iampg emulator running",
        "",
        f"  host name:  {emu.host}",
        f"  address:    {emu.listen_host}",
        f"  port:       {emu.port}",
        *(
            [f"  advertised: port {_signed_port(emu)} (tokens are signed for it: dial it)"]
            if _signed_port(emu) != emu.port
            else []
        ),
        f"  region:     {emu.region}",
        f"  CA file:    {env['PGSSLROOTCERT']}",
        f"  user:       {user}",
        f"  dbname:     {dbname}",
        f"  backend:    {_describe_backend(backend)}",
        *_behaviour(emu),
        "",
        "In another terminal, point libpq, botocore and iampg at it (the AWS keys are fake,",
        "accepted only by this emulator):",
        "",
        f"  unset {' '.join(unset)}",
        *(f"  export {name}={q(value)}" for name, value in env.items()),
        "",
        "then iampg token, iampg url, iampg env, iampg doctor and iampg psql need no arguments:",
        "",
        "  iampg psql -c 'select current_user'",
        '  eval "$(iampg env)" && psql',
        "",
        "Or, without the exports, connect with iampg or psycopg (iampg adds the token):",
        "",
        f"  {conninfo}",
        "",
        "or with psql and a token from the AWS CLI:",
        "",
        (
            f"  PGHOST={q(emu.host)} PGHOSTADDR={q(emu.listen_host)} PGPORT={_signed_port(emu)} "
            f"PGSSLMODE=verify-full PGSSLROOTCERT={q(env['PGSSLROOTCERT'])} \\"
        ),
        f'  PGPASSWORD="$({token})" \\',
        f"  psql -U {q(user)} {q(dbname)}",
        "",
        "Refused logins are reported here, with the reason. Press Ctrl-C to stop.",
    ]
    return "\n".join(lines)


# What to do about a refusal, by reason (the client only sees "PAM authentication failed").
_ADVICE = {
    "wrong region": "sign for region {region} (AWS_REGION, --region)",
    "wrong host": "sign for host {host} (PGHOST, --host) and dial it with PGHOSTADDR",
    "wrong port": "sign for port {port} (PGPORT, --port)",
    "wrong user": "the token was signed for another user than the one logging in",
    "unknown access key": "sign with the AWS keys printed above",
    "signature mismatch": "the secret key does not match the access key: use the keys above",
    "unexpected session token": "unset AWS_SESSION_TOKEN: the printed keys have none",
    "token expired": "sign a new token: a token is valid for 15 minutes",
    "credentials expired": "the keys that signed the token have expired",
    "wrong service": "sign for the emulator's service (--preset decides rds or dsql)",
    "wrong action": "DSQL: admin signs with DbConnectAdmin, other roles with DbConnect",
    "no encryption": "connect with sslmode=verify-full (PGSSLMODE)",
    "no sni": "connect by host name (PGHOST) with PGHOSTADDR, not to an IP address",
    "not granted rds_iam": "grant the database user rds_iam, as on RDS",
    "not authorized": "a policy of the signing identity must allow the action on the resource",
    "explicitly denied": "a Deny statement of the signing identity's policies matches",
}


class _RefusalReporter:
    """Print every refused login on stderr, with its reason and what to do; never a token."""

    def __init__(self) -> None:
        self.emulator: _Emulator | None = None
        self._last: object = None

    def poll(self) -> None:
        """Report the refusals recorded since the last call."""
        events: list[Any] | None = getattr(self.emulator, "events", None)
        if not events:
            return
        start = 0
        for index in range(len(events) - 1, -1, -1):
            if events[index] is self._last:
                start = index + 1
                break
        self._last = events[-1]
        for event in events[start:]:
            if event.outcome == "rejected":
                _error(self._describe(event))

    def _describe(self, event: Any) -> str:
        emu = self.emulator
        assert emu is not None
        advice = _ADVICE.get(event.reason, "")
        if advice:
            advice = ": " + advice.format(region=emu.region, host=emu.host, port=_signed_port(emu))
        who = f"user {event.user!r} database {event.database!r} from {event.peer}"
        detail = f" ({event.detail})" if getattr(event, "detail", "") else ""
        return f"refused {who}: {event.reason}{detail}{advice}"


def run(args: argparse.Namespace) -> int:
    """Run ``iampg emulate``: start a backend and the emulator, wait for SIGINT or SIGTERM.

    Call it from the main thread: it installs signal handlers for its duration. A second
    Ctrl-C interrupts a slow start-up or shutdown.

    Args:
        args: Options parsed by a parser set up with :func:`add_arguments`.

    Returns:
        The exit status: 0 after a clean stop, 1 on a runtime failure, 2 on a
        configuration error (each reported in one line on stderr).
    """
    stop = threading.Event()
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:  # noqa: ARG001
        if stop.is_set() and not stopping:
            raise KeyboardInterrupt  # a second Ctrl-C while starting: give up at once
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    running: list[tuple[str, _Stoppable]] = []  # what to stop, in start order
    refusals = _RefusalReporter()
    status = _EXIT_OK
    try:
        refusals.emulator = _start(args, stop, running)
        while not stop.wait(_WAIT_SLICE):
            refusals.poll()
        refusals.poll()
    except KeyboardInterrupt:
        pass
    except ValueError as exc:  # ConfigurationError and BackendConfigError included
        _error(str(exc))
        status = _EXIT_USAGE
    except (Error, OSError) as exc:
        _error(str(exc) if isinstance(exc, Error) else f"{type(exc).__name__}: {exc}")
        status = _EXIT_RUNTIME
    finally:
        stopping = True  # signals from now on only repeat the request; shutdown is bounded
        stop.set()
        status = _shutdown(running, status)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if status == _EXIT_OK:
        _say("stopped")
    return status


def _check_port(address: str, port: int) -> None:
    """Fail at once if ``port`` is taken, before a throwaway cluster is started for nothing.

    Raises:
        iampg.Error: The port cannot be bound; the message says what to do.
    """
    if not port:
        return
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the gateway binds
        try:
            probe.bind((address, port))
        except OSError as exc:
            raise Error(
                f"cannot listen on {address} port {port} ({exc.strerror or exc}): pick "
                "another --port, or --port 0 for a free one"
            ) from None


def _start(
    args: argparse.Namespace, stop: threading.Event, running: list[tuple[str, _Stoppable]]
) -> _Emulator | None:
    """Start the backend, then the emulator, appending each to *running*; print the banner.

    Returns the emulator; returns early, with whatever started in *running*, once *stop* is
    set.
    """
    factory = _load_emulator()
    _dsql_rules(args)  # a usage error before a throwaway cluster is started for nothing
    _check_port(args.listen, args.port)
    backend = _open_backend(args.backend)
    running.append(("backend", backend))
    if stop.is_set():
        return None
    user = _user(args)
    dsql = _chosen_preset(args) == "dsql"
    # RDS mode: the user logs in with a token only once granted rds_iam, as on RDS.
    backend.ensure_role(user, superuser=backend.kind == "temporary", iam=not dsql)
    with warnings.catch_warnings(record=True) as caught:  # e.g. listening beyond loopback
        warnings.simplefilter("always")
        emu = factory(backend.dsn, **_emulator_kwargs(args))
    for warning in caught:
        sys.stderr.write(f"{_PROG}: warning: {warning.message}\n")
    if stop.is_set():
        return None
    emu.start()
    running.append(("emulator", emu))
    _say(_banner(emu, backend, user, args.dbname))
    return emu


def _shutdown(running: list[tuple[str, _Stoppable]], status: int) -> int:
    """Stop what runs, newest first; return *status*, or 1 if stopping failed."""
    for name, item in reversed(running):
        if not _stop_one(name, item):
            status = status or _EXIT_RUNTIME
    running.clear()
    return status


def _stop_one(name: str, item: _Stoppable) -> bool:
    """Stop *item*; report a failure on stderr and return False."""
    try:
        item.stop()
    except (Error, OSError) as exc:
        _error(f"could not stop the {name}: {exc}")
        return False
    return True
