"""Backend: the real PostgreSQL server the emulator relays sessions to."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from iampg.errors import ConfigurationError, Error

if TYPE_CHECKING:
    from types import TracebackType

    from typing_extensions import Self

__all__ = ["RDS_IAM", "Backend", "BackendConfigError", "BackendError", "RdsIamCheck", "find_bindir"]

logger = logging.getLogger("iampg.emulator")

_START_TIMEOUT = 30.0  # seconds until a temporary cluster must accept connections
_STOP_TIMEOUT = 10.0  # seconds a fast shutdown may take before SIGKILL
_POLL_INTERVAL = 0.05  # seconds between readiness probes
_BIND_ATTEMPTS = 3  # fresh ports tried when a chosen free port was taken meanwhile
_LOG_TAIL_LINES = 20
_DIR_PREFIX = "iampg-pg-"
_OWNER_FILE = "owner.pid"
_SUPERUSER = "postgres"
#: The role RDS and Aurora require of a database user for IAM authentication.
RDS_IAM = "rds_iam"
# Membership as RDS judges it: granted, directly or through other roles. A superuser is not
# a member unless granted it (PostgreSQL's pg_has_role() would say it is).
_IS_RDS_IAM_MEMBER = """
WITH RECURSIVE member_of(oid) AS (
    SELECT oid FROM pg_roles WHERE rolname = %s
    UNION
    SELECT m.roleid FROM pg_auth_members m JOIN member_of ON m.member = member_of.oid
)
SELECT EXISTS (SELECT 1 FROM member_of JOIN pg_roles r USING (oid) WHERE r.rolname = %s)
"""
_ROLE_EXISTS = "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = %s)"
_SERVER_SETTINGS = {
    # Throwaway data: durability buys nothing, start-up and commit speed do.
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "32MB",
    "max_connections": "210",  # 200 sessions, plus the emulator's own (rds_iam checks)
    "huge_pages": "off",
    "jit": "off",
    "logging_collector": "off",
}


class BackendError(Error):
    """The backend PostgreSQL server could not be started, reached or used."""

    __module__ = "iampg.emulator"


class BackendConfigError(BackendError, ConfigurationError):
    """The backend cannot be set up as configured: no PostgreSQL binaries, or a bad DSN."""

    __module__ = "iampg.emulator"


@dataclass(frozen=True)
class _RunAs:
    """The unprivileged account child processes run as when we are root."""

    name: str
    uid: int
    gid: int


def _run_as() -> _RunAs | None:
    """Return the account to drop to as root (``postgres``, else ``nobody``), None otherwise."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return _RunAs(name, entry.pw_uid, entry.pw_gid)
    raise BackendConfigError(
        "running as root, and neither a 'postgres' nor a 'nobody' user exists to run "
        "PostgreSQL as: create one, or pass an existing server's DSN instead"
    )


def _version_key(path: Path) -> tuple[int, ...]:
    """Sort key for ``/usr/lib/postgresql/<version>/bin``: the version's numbers."""
    return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))


def _has_server(bindir: Path) -> bool:
    """Return whether *bindir* holds executable ``initdb`` and ``postgres``."""
    return all(os.access(bindir / name, os.X_OK) for name in ("initdb", "postgres"))


def _pg_config_bindir() -> Path | None:
    """Return what ``pg_config --bindir`` says, or None without a working pg_config."""
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    try:
        result = subprocess.run(  # noqa: S603 - a binary found on PATH, no shell
            [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return Path(result.stdout.strip()) if result.stdout.strip() else None


def find_bindir(bindir: str | os.PathLike[str] | None = None) -> Path:
    """Find the directory holding PostgreSQL's ``initdb`` and ``postgres``.

    Looks at *bindir*, then ``$IAMPG_PG_BINDIR``, ``pg_config --bindir``, the newest
    ``/usr/lib/postgresql/*/bin``, ``/usr/local/pgsql/bin`` and finally ``PATH``.

    Args:
        bindir: An explicit directory; it must hold the binaries.

    Returns:
        The directory.

    Raises:
        BackendConfigError: An explicit directory lacks the binaries, or none was found.
    """
    for explicit, origin in ((bindir, "bindir"), (os.environ.get("IAMPG_PG_BINDIR"), None)):
        if explicit:
            path = Path(explicit)
            if not _has_server(path):
                where = origin or "IAMPG_PG_BINDIR"
                raise BackendConfigError(
                    f"{where}={str(path)!r} holds no executable initdb and postgres: "
                    "point it at PostgreSQL's bin directory"
                )
            return path
    candidates: list[Path] = []
    from_pg_config = _pg_config_bindir()
    if from_pg_config is not None:
        candidates.append(from_pg_config)
    candidates.extend(
        sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    )
    candidates.append(Path("/usr/local/pgsql/bin"))
    on_path = shutil.which("initdb")
    if on_path is not None:
        candidates.append(Path(on_path).parent)
    for candidate in candidates:
        if _has_server(candidate):
            return candidate
    raise BackendConfigError(
        "no PostgreSQL server binaries (initdb, postgres) found: install PostgreSQL, set "
        "IAMPG_PG_BINDIR to its bin directory, or give an existing server's DSN "
        "(IAMPG_EMULATOR_BACKEND)"
    )


def _free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _traversable(path: Path, run_as: _RunAs) -> bool:
    """Return whether *run_as* may search every directory from ``/`` down to *path*."""
    for directory in (path, *path.parents):
        try:
            st = directory.stat()
        except OSError:
            return False
        if st.st_uid == run_as.uid:
            bit = 0o100
        elif st.st_gid == run_as.gid:
            bit = 0o010
        else:
            bit = 0o001
        if not st.st_mode & bit:
            return False
    return True


def _make_tempdir(run_as: _RunAs | None) -> Path:
    """Create a private (0700) directory for a cluster, owned by *run_as* if given."""
    bases = [Path(tempfile.gettempdir()).resolve()]
    if run_as is not None:
        bases.append(Path("/tmp"))  # noqa: S108 - fallback when $TMPDIR is private to root
        usable = [base for base in bases if _traversable(base, run_as)]
        if not usable:
            raise BackendConfigError(
                f"the temporary directory {str(bases[0])!r} is not reachable by the "
                f"{run_as.name!r} user PostgreSQL runs as: set TMPDIR to a directory "
                "every user can enter"
            )
        bases = usable
    path = Path(tempfile.mkdtemp(prefix=_DIR_PREFIX, dir=bases[0]))
    (path / _OWNER_FILE).write_text(f"{os.getpid()}\n", encoding="ascii")
    if run_as is not None:
        os.chown(path, run_as.uid, run_as.gid)
    return path


def _one_line(exc: BaseException | None) -> str:
    """Return an exception's message on one line (libpq's span several)."""
    return " ".join(str(exc).split())


def _log_tail(log: Path, lines: int = _LOG_TAIL_LINES) -> str:
    """Return the last *lines* lines of a log file, or a note that it cannot be read."""
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"(no server log: {exc})"
    return "\n".join(text.splitlines()[-lines:]) or "(the server log is empty)"


def _pid_alive(pid: int) -> bool:
    """Return whether a process with this id exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_our_postmaster(pid: int, datadir: Path) -> bool:
    """Return whether *pid* is a postgres running on *datadir* (Linux ``/proc`` only)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(cmdline) and cmdline[0].endswith(b"postgres") and os.fsencode(datadir) in cmdline


def _reap_orphans() -> None:
    """Stop and remove clusters left behind by processes that died without cleaning up.

    Only directories made by :meth:`Backend.temporary` whose owning process is gone are
    touched; a postmaster is signalled only when ``/proc`` confirms it serves that directory.
    """
    for base in {Path(tempfile.gettempdir()).resolve(), Path("/tmp")}:  # noqa: S108
        for path in base.glob(f"{_DIR_PREFIX}*"):
            try:
                owner = int((path / _OWNER_FILE).read_text(encoding="ascii").split()[0])
            except (OSError, ValueError, IndexError):
                continue
            if _pid_alive(owner):
                continue
            datadir = path / "data"
            with contextlib.suppress(OSError, ValueError, IndexError):
                pid = int((datadir / "postmaster.pid").read_text(encoding="ascii").split()[0])
                if _is_our_postmaster(pid, datadir):
                    os.kill(pid, signal.SIGQUIT)  # immediate shutdown: nothing to keep
            logger.debug("removing orphaned cluster %s of dead process %d", path, owner)
            shutil.rmtree(path, ignore_errors=True)


def _stop_process(process: subprocess.Popen[bytes]) -> None:
    """Fast-shut-down a postmaster: SIGINT, then SIGKILL after 10 seconds."""
    if process.poll() is not None:
        return
    logger.debug("stopping temporary cluster pid %d", process.pid)
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGINT)  # SIGINT is the postmaster's fast shutdown
    try:
        process.wait(timeout=_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        logger.warning("temporary cluster pid %d ignored fast shutdown: killing", process.pid)
        process.kill()
        process.wait()


def _stop_cluster(process: subprocess.Popen[bytes], tempdir: Path, creator: int) -> None:
    """Stop a postmaster and remove its directory (a finalizer: it must not hold the Backend).

    Does nothing in a forked child of the creating process: the cluster is the parent's.
    """
    if os.getpid() != creator:
        return
    try:
        _stop_process(process)
    finally:
        shutil.rmtree(tempdir, ignore_errors=True)
        logger.debug("removed %s", tempdir)


class Backend:
    """A real PostgreSQL server the emulator relays sessions to.

    Either an existing server (:meth:`from_dsn`), left alone by :meth:`stop`, or a
    throwaway cluster (:meth:`temporary`) that :meth:`stop` shuts down and deletes, also at
    interpreter exit if nobody called it. Use as a context manager to stop on exit.

    Attributes:
        dsn: A libpq ``key=value`` connection string for a superuser connection.
        host: The host name, address or unix socket directory the DSN dials.
        port: The server's port.
        user: The user of :attr:`dsn`.
        password: The password of :attr:`dsn`, None without one (never shown in ``repr``).
        dbname: The database of :attr:`dsn`.
        kind: ``"dsn"`` for an existing server, ``"temporary"`` for a throwaway cluster.
        socket_dir: The unix socket directory of a temporary cluster, else None.
        datadir: The data directory of a temporary cluster, else None.
    """

    def __init__(
        self,
        dsn: str,
        *,
        kind: Literal["dsn", "temporary"] = "dsn",
        socket_dir: Path | None = None,
        datadir: Path | None = None,
    ) -> None:
        try:
            params = {k: str(v) for k, v in conninfo_to_dict(dsn).items() if v is not None}
            self.dsn: str = make_conninfo("", **params)
        except psycopg.ProgrammingError as exc:
            raise BackendConfigError(f"invalid backend DSN: {_one_line(exc)}") from None
        self.kind = kind
        self.socket_dir = socket_dir
        self.datadir = datadir
        env = os.environ
        port = params.get("port") or env.get("PGPORT") or "5432"
        try:
            self.port: int = int(port.split(",")[0])
        except ValueError:
            raise BackendConfigError(f"invalid port in backend DSN: {port!r}") from None
        self.host: str = params.get("host") or env.get("PGHOST") or _default_host(self.port)
        self.user: str = params.get("user") or env.get("PGUSER") or _login_name()
        self.password: str | None = params.get("password") or env.get("PGPASSWORD")
        self.dbname: str = params.get("dbname") or env.get("PGDATABASE") or self.user
        self._process: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[..., Backend] | None = None

    @classmethod
    def from_dsn(cls, dsn: str) -> Backend:
        """Use an existing server; :meth:`stop` leaves it running.

        Args:
            dsn: A libpq ``key=value`` string or ``postgresql://`` URL for a user allowed to
                create roles (see :meth:`ensure_role`). Unset keys follow libpq's ``PG*``
                environment variables.

        Returns:
            The backend. Nothing is dialled yet.

        Raises:
            BackendConfigError: The DSN cannot be parsed.
        """
        return cls(dsn)

    @classmethod
    def temporary(cls, *, bindir: str | os.PathLike[str] | None = None, port: int = 0) -> Backend:
        """Start a throwaway cluster (trust authentication, superuser ``postgres``).

        The cluster listens on ``127.0.0.1`` and on a unix socket in its private temporary
        directory, with durability turned off for speed. As root, ``initdb`` and
        ``postgres`` run as the ``postgres`` user (else ``nobody``), since PostgreSQL
        refuses to run as root. :meth:`stop` (or interpreter exit) shuts it down and deletes
        the directory; clusters orphaned by killed processes are removed on the next call.

        Args:
            bindir: PostgreSQL's bin directory; found automatically when None (see
                :func:`find_bindir`).
            port: The TCP port, 0 for a free one.

        Returns:
            The backend, accepting connections.

        Raises:
            BackendConfigError: No binaries were found, or there is no user to run them as.
            BackendError: The cluster failed to initialise or start within 30 seconds; the
                message ends with the server log's tail.
        """
        started = time.monotonic()
        binaries = find_bindir(bindir)
        run_as = _run_as()
        with contextlib.suppress(OSError):
            _reap_orphans()
        tempdir = _make_tempdir(run_as)
        try:
            backend = cls._start(binaries, tempdir, run_as, port)
        except BaseException:
            shutil.rmtree(tempdir, ignore_errors=True)
            raise
        logger.info(
            "temporary cluster ready on 127.0.0.1:%d in %.2f s (%s)",
            backend.port,
            time.monotonic() - started,
            binaries,
        )
        return backend

    @classmethod
    def _start(cls, bindir: Path, tempdir: Path, run_as: _RunAs | None, port: int) -> Backend:
        """Run initdb in *tempdir*, then start postgres, retrying ports taken meanwhile."""
        datadir = tempdir / "data"
        log = tempdir / "postgres.log"
        # As root: the unprivileged account, without root's supplementary groups.
        user = run_as.uid if run_as is not None else None
        group = run_as.gid if run_as is not None else None
        extra_groups: list[int] | None = [] if run_as is not None else None
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        initdb = [
            str(bindir / "initdb"),
            "-D",
            str(datadir),
            "-U",
            _SUPERUSER,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-locale",
            "--no-sync",
        ]
        logger.debug("running %s as %s", initdb, run_as.name if run_as else "ourselves")
        try:
            result = subprocess.run(  # noqa: S603, PLW1510 - fixed argv, no shell; checked below
                initdb,
                cwd=tempdir,
                env=env,
                capture_output=True,
                timeout=_START_TIMEOUT,
                user=user,
                group=group,
                extra_groups=extra_groups,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise BackendError(f"could not run initdb: {exc}") from exc
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode(errors="replace").strip()
            tail = "\n".join(output.splitlines()[-_LOG_TAIL_LINES:])
            raise BackendError(f"initdb failed with exit code {result.returncode}:\n{tail}")

        for attempt in range(1, _BIND_ATTEMPTS + 1):
            chosen = port or _free_port()
            argv = [str(bindir / "postgres"), "-D", str(datadir), "-p", str(chosen)]
            settings = {
                **_SERVER_SETTINGS,
                "listen_addresses": "127.0.0.1",
                "unix_socket_directories": str(tempdir),
            }
            for name, value in settings.items():
                argv += ["-c", f"{name}={value}"]
            logger.debug("starting %s", argv)
            with log.open("ab") as log_file:
                try:
                    process = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                        argv,
                        cwd=tempdir,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=log_file,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,  # a terminal's Ctrl-C is for us, not for it
                        user=user,
                        group=group,
                        extra_groups=extra_groups,
                    )
                except OSError as exc:
                    raise BackendError(f"could not start postgres: {exc}") from exc
            backend = cls(
                # hostaddr and sslmode too: the PGHOSTADDR and PGSSLMODE=verify-full that
                # `iampg emulate` has users export must not redirect or break the emulator's
                # own backend connections (the throwaway cluster has no TLS).
                make_conninfo(
                    "",
                    host="127.0.0.1",
                    hostaddr="127.0.0.1",
                    port=chosen,
                    user=_SUPERUSER,
                    dbname="postgres",
                    sslmode="disable",
                ),
                kind="temporary",
                socket_dir=tempdir,
                datadir=datadir,
            )
            backend._process = process
            backend._finalizer = weakref.finalize(
                backend, _stop_cluster, process, tempdir, os.getpid()
            )
            try:
                backend._wait_ready(log)
            except BackendError:
                process_gone = process.poll() is not None
                backend._finalizer.detach()  # the caller removes tempdir
                _stop_process(process)
                retry = not port and attempt < _BIND_ATTEMPTS
                if retry and process_gone and "could not bind" in _log_tail(log):
                    logger.debug("port %d was taken meanwhile: trying another", chosen)
                    continue
                raise
            except BaseException:
                backend._finalizer()
                raise
            return backend
        raise AssertionError("unreachable")  # pragma: no cover

    def _wait_ready(self, log: Path) -> None:
        """Poll until the server accepts connections, it exits, or the deadline passes.

        Probes the unix socket, which answers only once the postmaster is ready, so that a
        stranger holding the TCP port cannot stall the probe; then checks TCP once.
        """
        assert self._process is not None
        deadline = time.monotonic() + _START_TIMEOUT
        probe = self.conninfo(host=str(self.socket_dir)) if self.socket_dir else self.dsn
        last: Exception | None = None
        while True:
            code = self._process.poll()
            if code is not None:
                raise BackendError(
                    f"postgres exited with code {code} while starting; server log:\n"
                    + _log_tail(log)
                )
            try:
                with psycopg.connect(probe, connect_timeout=2, autocommit=True) as conn:
                    conn.execute("SELECT 1")
            except psycopg.OperationalError as exc:
                last = exc
            else:
                break
            if time.monotonic() >= deadline:
                raise BackendError(
                    f"postgres did not accept connections within {_START_TIMEOUT:.0f} s "
                    f"({_one_line(last)}); server log:\n" + _log_tail(log)
                )
            time.sleep(_POLL_INTERVAL)
        try:
            with psycopg.connect(self.dsn, connect_timeout=5, autocommit=True) as conn:
                conn.execute("SELECT 1")
        except psycopg.OperationalError as exc:
            raise BackendError(
                f"postgres is up but not reachable at 127.0.0.1:{self.port} ({_one_line(exc)}); "
                "server log:\n" + _log_tail(log)
            ) from exc

    @classmethod
    def auto(cls) -> Backend:
        """Use ``$IAMPG_EMULATOR_BACKEND`` (a DSN) if set, else start a temporary cluster.

        Returns:
            The backend.

        Raises:
            BackendConfigError: See :meth:`from_dsn` and :meth:`temporary`.
            BackendError: See :meth:`temporary`.
        """
        dsn = os.environ.get("IAMPG_EMULATOR_BACKEND")
        if dsn:
            return cls.from_dsn(dsn)
        return cls.temporary()

    @property
    def pid(self) -> int | None:
        """The postmaster's process id for a temporary cluster, else None."""
        return self._process.pid if self._process is not None else None

    def conninfo(self, **overrides: str | int) -> str:
        """Return :attr:`dsn` with some keys replaced, e.g. ``conninfo(user="alice")``.

        Args:
            overrides: libpq keywords and their values.

        A new ``host`` clears the DSN's ``hostaddr`` (the address of the old host) unless
        ``hostaddr`` is given too; cleared, not dropped, so that an exported ``PGHOSTADDR``
        does not take its place.

        Returns:
            A ``key=value`` connection string.
        """
        if "host" in overrides and "hostaddr" not in overrides:
            overrides = {**overrides, "hostaddr": ""}
        return make_conninfo(self.dsn, **overrides)

    def stop(self) -> None:
        """Shut down and delete a temporary cluster; do nothing for an existing server.

        Sends the postmaster SIGINT (fast shutdown: open sessions are rolled back), waits up
        to 10 seconds, then kills it. Safe to call more than once.
        """
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def ensure_role(self, name: str, *, superuser: bool = False, iam: bool = False) -> None:
        """Create a login role unless one of that name exists; grant it ``rds_iam`` if asked.

        An emulator in RDS mode accepts a token only for a user that is a member of
        ``rds_iam``, as RDS and Aurora do (``GRANT rds_iam TO <user>``): pass ``iam=True``
        for every user that logs in with a token. An existing role is otherwise unchanged.

        Args:
            name: The role's name, used verbatim (quoted as an identifier).
            superuser: Create it as a superuser.
            iam: Grant it ``rds_iam`` (creating that role if missing); also for an
                existing role.

        Raises:
            BackendError: The server could not be reached or refused.
        """
        query = sql.SQL("CREATE ROLE {} LOGIN{}").format(
            sql.Identifier(name), sql.SQL(" SUPERUSER" if superuser else "")
        )
        try:
            with psycopg.connect(self.dsn, connect_timeout=10, autocommit=True) as conn:
                exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,))
                if exists.fetchone() is None:
                    try:
                        conn.execute(query)
                        logger.info("created role %r on the backend", name)
                    except psycopg.errors.DuplicateObject:
                        pass  # created concurrently
                if iam:
                    _create_rds_iam(conn)
                    conn.execute(
                        sql.SQL("GRANT {} TO {}").format(
                            sql.Identifier(RDS_IAM), sql.Identifier(name)
                        )
                    )
        except psycopg.Error as exc:
            raise BackendError(
                f"could not ensure role {name!r} on {self!r}: {_one_line(exc)}"
            ) from exc

    def terminate_sessions(self, application_name: str) -> int:
        """End every client session of ``application_name``, as a restart or failover would.

        The gateway relays the close, so the clients' connections break: a way to test that
        an application survives losing its pooled connections. Waits (up to 5 s each) until
        the sessions are gone.

        Args:
            application_name: The libpq ``application_name`` the sessions were opened with.

        Returns:
            How many sessions were ended.

        Raises:
            BackendError: The server could not be reached or refused.
        """
        try:
            with psycopg.connect(self.dsn, connect_timeout=10, autocommit=True) as conn:
                rows = conn.execute(
                    "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
                    "WHERE application_name = %s AND pid <> pg_backend_pid()",
                    (application_name,),
                ).fetchall()
        except psycopg.Error as exc:
            raise BackendError(
                f"could not end the sessions of {application_name!r} on {self!r}: {_one_line(exc)}"
            ) from exc
        return sum(1 for (ended,) in rows if ended)

    def __repr__(self) -> str:
        state = ""
        if self.kind == "temporary":
            alive = self._finalizer is not None and self._finalizer.alive
            state = f" pid={self.pid}" if alive else " stopped"
        return (
            f"<Backend {self.kind} host={self.host!r} port={self.port} user={self.user!r} "
            f"dbname={self.dbname!r}{state}>"
        )


def _create_rds_iam(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """Create the ``rds_iam`` role (no login) unless it exists."""
    if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (RDS_IAM,)).fetchone():
        return
    with contextlib.suppress(psycopg.errors.DuplicateObject):  # created concurrently
        conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(RDS_IAM)))


class RdsIamCheck:
    """Asks the backend whether a database user is a member of ``rds_iam`` (asyncio).

    One connection with the backend DSN, opened on first use and again after a failure;
    the first one creates ``rds_iam`` on the backend if it is missing. Use it on one event
    loop; :meth:`aclose` when done.

    Args:
        dsn: The backend's libpq connection string.
        connect_timeout: Seconds to wait for the backend.
    """

    def __init__(self, dsn: str, *, connect_timeout: float) -> None:
        self._dsn = dsn
        self._timeout = connect_timeout
        self._conn: psycopg.AsyncConnection[tuple[object, ...]] | None = None
        self._created = False
        self._lock: asyncio.Lock | None = None  # made on the loop that first uses it

    async def is_member(self, user: str) -> bool:
        """Tell whether ``user`` is granted ``rds_iam``, directly or through another role.

        Raises:
            BackendError: The backend could not be reached or refused the query.
        """
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # one query at a time on the one connection
            try:
                conn = await self._connection()
                cursor = await conn.execute(_IS_RDS_IAM_MEMBER, (user, RDS_IAM))
                row = await cursor.fetchone()
            except psycopg.Error as exc:
                await self.aclose()
                raise BackendError(f"could not check rds_iam: {_one_line(exc)}") from exc
        return bool(row and row[0])

    async def exists(self, user: str) -> bool:
        """Tell whether the database user ``user`` exists.

        Raises:
            BackendError: The backend could not be reached or refused the query.
        """
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            try:
                conn = await self._connection()
                cursor = await conn.execute(_ROLE_EXISTS, (user,))
                row = await cursor.fetchone()
            except psycopg.Error as exc:
                await self.aclose()
                raise BackendError(f"could not look up the user: {_one_line(exc)}") from exc
        return bool(row and row[0])

    async def _connection(self) -> psycopg.AsyncConnection[tuple[object, ...]]:
        conn = self._conn
        if conn is None or conn.closed:
            conn = await psycopg.AsyncConnection.connect(
                self._dsn,
                autocommit=True,
                connect_timeout=max(1, round(self._timeout)),
                application_name="iampg emulator",
            )
            self._conn = conn
            if not self._created:
                await self._create_role(conn)
        return conn

    async def _create_role(self, conn: psycopg.AsyncConnection[tuple[object, ...]]) -> None:
        cursor = await conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (RDS_IAM,))
        if await cursor.fetchone() is None:
            try:
                await conn.execute(
                    sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(RDS_IAM))
                )
            except psycopg.errors.DuplicateObject:
                pass
            except psycopg.Error as exc:
                logger.warning(
                    "emulator cannot create the rds_iam role on its backend (%s): "
                    "no user can log in until it exists",
                    _one_line(exc),
                )
                return
        self._created = True

    async def aclose(self) -> None:
        """Close the connection (a later check opens a new one)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                await conn.close()


def _login_name() -> str:
    """Return the user name libpq defaults to: the current account's."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:  # an account without a passwd entry, as in some containers
        return os.environ.get("USER") or str(os.getuid())


def _default_host(port: int) -> str:
    """Guess where libpq dials without a host: a local socket directory, else localhost."""
    for directory in ("/var/run/postgresql", "/run/postgresql", "/tmp"):  # noqa: S108
        if Path(directory, f".s.PGSQL.{port}").exists():
            return directory
    return "localhost"
