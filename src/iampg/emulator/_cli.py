"""The ``iampg emulate`` command: run the emulator in front of a PostgreSQL backend."""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
import warnings
from typing import TYPE_CHECKING, Any, Protocol

from iampg.emulator._backend import Backend, find_bindir
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
_PROFILES = ("rds", "aurora-express", "dsql")
_WAIT_SLICE = 0.5  # seconds; the main thread wakes this often while waiting for a signal


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
    except ImportError as exc:
        raise ConfigurationError(
            f"the emulator cannot be loaded ({exc}): install iampg[emulator]"
        ) from exc
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
        "--profile",
        choices=_PROFILES,
        default=None,
        help="the service to behave like: rds (tokens only; the default), aurora-express "
        "(auto-pause, ~16 s resume, ~3.5 s connect latency, 5-minute idle cut) or dsql "
        "(DSQL tokens and host name, SNI required, 1-hour session cap, connection limits)",
    )
    parser.add_argument(
        "--user",
        default=None,
        help="database user to create on the backend if missing "
        "(default: admin with --profile dsql, else postgres)",
    )
    parser.add_argument(
        "--dbname", default="postgres", help="database for the examples (default: %(default)s)"
    )


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
    if getattr(args, "profile", None):
        kwargs["profile"] = args.profile
    return kwargs


def _user(args: argparse.Namespace) -> str:
    """Return the database user: ``--user``, else the service's usual one."""
    if args.user:
        return str(args.user)
    return "admin" if getattr(args, "profile", None) == "dsql" else "postgres"


def _behaviour(emu: _Emulator) -> list[str]:
    """Return the banner lines describing the emulator's profile (none for a stand-in)."""
    profile = getattr(emu, "profile", None)
    if profile is None:
        return []
    lines = profile.describe()
    return [f"  profile:    {profile.name}", *(f"              {line}" for line in lines)]


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
        f"aws rds generate-db-auth-token --hostname {q(emu.host)} --port {emu.port} "
        f"--region {q(emu.region)} --username {q(user)}"
    )


def _describe_backend(backend: Backend) -> str:
    """Describe the backend in one line, without its password."""
    if backend.kind == "temporary":
        return f"temporary cluster at {backend.host}:{backend.port} (deleted on stop)"
    return f"{backend.host}:{backend.port} user={backend.user} dbname={backend.dbname}"


def _banner(emu: _Emulator, backend: Backend, user: str, dbname: str) -> str:
    """Return what to print once the emulator runs: where it is and how to connect."""
    q = shlex.quote
    env = dict(emu.aws_env())
    env.setdefault("AWS_ACCESS_KEY_ID", emu.credentials.access_key_id)
    env.setdefault("AWS_SECRET_ACCESS_KEY", emu.credentials.secret_access_key)
    if emu.credentials.session_token:
        env.setdefault("AWS_SESSION_TOKEN", emu.credentials.session_token)
    env.setdefault("AWS_REGION", emu.region)
    ca_file = str(emu.ca_file)
    conninfo = emu.conninfo(user, dbname=dbname)
    token = _token_command(emu, user)
    lines = [
        "iampg emulator running",
        "",
        f"  host name:  {emu.host}",
        f"  address:    {emu.listen_host}",
        f"  port:       {emu.port}",
        f"  region:     {emu.region}",
        f"  CA file:    {ca_file}",
        f"  user:       {user}",
        f"  dbname:     {dbname}",
        f"  backend:    {_describe_backend(backend)}",
        *_behaviour(emu),
        "",
        "Fake AWS credentials (accepted only by this emulator):",
        "",
        *(f"  export {name}={q(value)}" for name, value in env.items()),
        f"  export PGSSLROOTCERT={q(ca_file)}",
        "",
        "Connect with iampg or psycopg (iampg supplies the token as the password):",
        "",
        f"  {conninfo}",
        "",
        "Connect with psql, the token from iampg:",
        "",
        f'  eval "$(iampg env {q(conninfo)})" && psql',
        "",
        "or from the AWS CLI:",
        "",
        (
            f"  PGHOST={q(emu.host)} PGHOSTADDR={q(emu.listen_host)} PGPORT={emu.port} "
            f"PGSSLMODE=verify-full PGSSLROOTCERT={q(ca_file)} \\"
        ),
        f'  PGPASSWORD="$({token})" \\',
        f"  psql -U {q(user)} {q(dbname)}",
        "",
        "Press Ctrl-C to stop.",
    ]
    return "\n".join(lines)


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
    status = _EXIT_OK
    try:
        _start(args, stop, running)
        while not stop.wait(_WAIT_SLICE):
            pass
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


def _start(
    args: argparse.Namespace, stop: threading.Event, running: list[tuple[str, _Stoppable]]
) -> None:
    """Start the backend, then the emulator, appending each to *running*; print the banner.

    Returns early, with whatever started in *running*, once *stop* is set.
    """
    factory = _load_emulator()
    backend = _open_backend(args.backend)
    running.append(("backend", backend))
    if stop.is_set():
        return
    user = _user(args)
    backend.ensure_role(user, superuser=backend.kind == "temporary")
    with warnings.catch_warnings(record=True) as caught:  # e.g. listening beyond loopback
        warnings.simplefilter("always")
        emu = factory(backend.dsn, **_emulator_kwargs(args))
    for warning in caught:
        sys.stderr.write(f"{_PROG}: warning: {warning.message}\n")
    if stop.is_set():
        return
    emu.start()
    running.append(("emulator", emu))
    _say(_banner(emu, backend, user, args.dbname))


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
