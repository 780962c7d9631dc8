"""Tests of ``iampg emulate``: run() in a subprocess, its banner, signals and exit codes."""

from __future__ import annotations

import dataclasses
import os
import queue
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import psycopg
import pytest

import iampg.emulator
from iampg.emulator._backend import Backend

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import IO

TIMEOUT = 60.0  # seconds any one step of a subprocess may take
HAVE_EMULATOR = hasattr(iampg.emulator, "Emulator")

# What the subprocess runs: the subcommand's parser and run(), as iampg.cli wires them.
RUNNER = """\
import argparse, sys
from iampg.emulator import _cli
{standin}
parser = argparse.ArgumentParser(prog="iampg emulate")
_cli.add_arguments(parser)
sys.exit(_cli.run(parser.parse_args(sys.argv[1:])))
"""

# A stand-in for iampg.emulator.Emulator: checks the backend DSN works, then listens on a
# port and hangs up on every connection. Used where the real gateway is beside the point.
STANDIN = """\
import socket, threading
from pathlib import Path
from types import SimpleNamespace
import psycopg

class StandIn:
    def __init__(self, dsn, *, hostnames=("standin.cluster-x.us-east-1.rds.amazonaws.com",),
                 region="us-east-1", listen_host="127.0.0.1", port=0, time_scale=1.0):
        self.dsn, self.host, self.region = dsn, hostnames[0], region
        self.listen_host, self.port, self.time_scale = listen_host, port, time_scale
        self.ca_file = Path("/nonexistent/ca.pem")
        self.credentials = SimpleNamespace(
            access_key_id="AKIAIOSFODNN7EXAMPLE",
            secret_access_key="wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            session_token=None,
        )
        self._stopped = threading.Event()

    def start(self):
        psycopg.connect(self.dsn, connect_timeout=5).close()
        self._sock = socket.create_server((self.listen_host, self.port))
        self._sock.settimeout(0.1)
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve)
        self._thread.start()

    def _serve(self):
        while not self._stopped.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            conn.close()

    def stop(self):
        self._stopped.set()
        self._thread.join(5)
        self._sock.close()

    def aws_env(self):
        return {"AWS_ACCESS_KEY_ID": self.credentials.access_key_id,
                "AWS_SECRET_ACCESS_KEY": self.credentials.secret_access_key,
                "AWS_REGION": self.region}

    def conninfo(self, user, dbname="postgres"):
        return (f"host={self.host} hostaddr={self.listen_host} port={self.port} "
                f"user={user} dbname={dbname}")

_cli._load_emulator = lambda: StandIn
"""


class Emulate:
    """A running ``iampg emulate`` subprocess whose output is read by two threads."""

    def __init__(
        self,
        args: list[str],
        *,
        standin: bool,
        env: dict[str, str],
        command: list[str] | None = None,
    ) -> None:
        code = RUNNER.format(standin=STANDIN if standin else "")
        self.proc = subprocess.Popen(
            [*(command or [sys.executable, "-c", code]), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.stdout: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str | None] = []
        assert self.proc.stdout is not None
        assert self.proc.stderr is not None
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.stdout.put)),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr.append)),
        ]
        for thread in self._threads:
            thread.start()

    @staticmethod
    def _pump(stream: IO[str], put: Callable[[str | None], None]) -> None:
        for line in stream:
            put(line)
        put(None)

    def read_until(self, text: str, timeout: float = TIMEOUT) -> list[str]:
        """Return stdout lines up to and including the first one containing *text*."""
        lines: list[str] = []
        while True:
            try:
                line = self.stdout.get(timeout=timeout)
            except queue.Empty:
                pytest.fail(f"no {text!r} within {timeout} s; got {lines!r}")
            if line is None:
                self.finish()
                pytest.fail(f"exited before {text!r}: {lines!r} {self.stderr!r}")
            lines.append(line.rstrip("\n"))
            if text in line:
                return lines

    def finish(self, timeout: float = TIMEOUT) -> tuple[int, list[str], str]:
        """Wait for the exit; return the code, the remaining stdout lines and stderr."""
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            self.close()
        rest = []
        while not self.stdout.empty():
            line = self.stdout.get_nowait()
            if line is not None:
                rest.append(line.rstrip("\n"))
        return code, rest, "".join(line for line in self.stderr if line is not None)

    def close(self) -> None:
        """Stop the process if it still runs (Ctrl-C, then SIGKILL); close the pipes."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait(timeout=TIMEOUT)
        for thread in self._threads:
            thread.join(timeout=TIMEOUT)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def env() -> dict[str, str]:
    """Return the subprocess environment: our import path, no backend preset."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("IAMPG_")}
    environ["PYTHONPATH"] = os.pathsep.join(sys.path)
    return environ


class Launch(Protocol):
    def __call__(
        self, args: list[str], *, standin: bool = True, command: list[str] | None = None
    ) -> Emulate: ...


@pytest.fixture
def run_emulate(env: dict[str, str]) -> Iterator[Launch]:
    """Start subprocesses with the test environment; stop any left running."""
    started: list[Emulate] = []

    def launch(
        args: list[str], *, standin: bool = True, command: list[str] | None = None
    ) -> Emulate:
        emulate = Emulate(args, standin=standin, env=env, command=command)
        started.append(emulate)
        return emulate

    yield launch
    for emulate in started:
        emulate.close()


@pytest.fixture(scope="module")
def existing_server() -> Iterator[Backend]:
    """Return a throwaway cluster playing an existing server the CLI is pointed at."""
    with Backend.temporary() as backend:
        yield backend


def _field(banner: list[str], name: str) -> str:
    """Return the value of a ``  name:  value`` banner line."""
    for line in banner:
        key, sep, value = line.strip().partition(":")
        if sep and key == name:
            return value.strip()
    pytest.fail(f"no {name!r} line in {banner!r}")


def _exports(banner: list[str]) -> dict[str, str]:
    """Return the variables of the banner's ``export NAME=value`` lines."""
    found = {}
    for line in banner:
        if line.strip().startswith("export "):
            _, assignment = shlex.split(line)
            name, _, value = assignment.partition("=")
            found[name] = value
    return found


def _accepts_tcp(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=5):
            return True
    except OSError:
        return False


def _leftover_clusters(pid: int) -> list[Path]:
    """Return cluster directories still owned by process *pid*."""
    found = []
    for path in Path(tempfile.gettempdir()).glob("iampg-pg-*"):
        try:
            owner = (path / "owner.pid").read_text(encoding="ascii").strip()
        except OSError:
            continue
        if owner == str(pid):
            found.append(path)
    return found


@pytest.mark.slow
@pytest.mark.parametrize(
    "standin",
    [
        pytest.param(True, id="stand-in"),
        pytest.param(
            False,
            id="gateway",
            marks=pytest.mark.skipif(not HAVE_EMULATOR, reason="no iampg.emulator.Emulator"),
        ),
    ],
)
def test_emulate_on_a_temporary_cluster_stops_on_sigint(run_emulate: Launch, standin: bool) -> None:
    """With no backend given, a temporary cluster serves; Ctrl-C stops all, exit 0."""
    emulate = run_emulate(["--port", "0"], standin=standin)
    banner = emulate.read_until("Ctrl-C")
    assert banner[-1].endswith("Press Ctrl-C to stop.")
    exports = _exports(banner)
    assert exports["AWS_ACCESS_KEY_ID"] == "AKIAIOSFODNN7EXAMPLE"
    assert exports["AWS_SECRET_ACCESS_KEY"] == "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    assert exports["AWS_REGION"] == _field(banner, "region")
    assert exports["PGSSLROOTCERT"] == _field(banner, "CA file")
    assert any("psql" in line and "PGPASSWORD" not in line for line in banner)
    address, port = _field(banner, "address"), int(_field(banner, "port"))
    assert address == "127.0.0.1"
    assert port > 0
    assert _accepts_tcp(address, port)
    backend_port = int(_field(banner, "backend").split(":")[1].split()[0])
    assert _accepts_tcp("127.0.0.1", backend_port)
    if not standin:
        _connect_through_gateway(banner)

    emulate.proc.send_signal(signal.SIGINT)
    code, rest, stderr = emulate.finish()
    assert (code, rest, stderr) == (0, ["stopped"], "")
    assert not _accepts_tcp(address, port)
    assert not _accepts_tcp("127.0.0.1", backend_port)
    assert _leftover_clusters(emulate.proc.pid) == []


def _connect_through_gateway(banner: list[str]) -> None:
    """Sign a token with the printed credentials and run a query through the gateway."""
    import botocore.session

    exports = _exports(banner)
    host, port = _field(banner, "host name"), int(_field(banner, "port"))
    region, user = _field(banner, "region"), _field(banner, "user")
    session = botocore.session.get_session()
    session.set_credentials(
        exports["AWS_ACCESS_KEY_ID"],
        exports["AWS_SECRET_ACCESS_KEY"],
        exports.get("AWS_SESSION_TOKEN"),
    )
    client = session.create_client("rds", region_name=region)
    token = client.generate_db_auth_token(host, port, user, Region=region)
    with psycopg.connect(
        host=host,
        hostaddr=_field(banner, "address"),
        port=port,
        user=user,
        dbname=_field(banner, "dbname"),
        password=token,
        sslmode="verify-full",
        sslrootcert=exports["PGSSLROOTCERT"],
        connect_timeout=10,
    ) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (user,)


@pytest.mark.slow
def test_emulate_on_an_existing_server_stops_on_sigterm(
    run_emulate: Launch, existing_server: Backend
) -> None:
    """--backend, --host, --region and --user are used; SIGTERM stops, the server lives on."""
    emulate = run_emulate(
        [
            "--backend",
            existing_server.dsn,
            "--host",
            "one.cluster-abc.eu-west-1.rds.amazonaws.com",
            "--host",
            "two.cluster-abc.eu-west-1.rds.amazonaws.com",
            "--region",
            "eu-west-1",
            "--user",
            "cli_user",
            "--dbname",
            "app",
        ]
    )
    banner = emulate.read_until("Ctrl-C")
    assert _field(banner, "host name") == "one.cluster-abc.eu-west-1.rds.amazonaws.com"
    assert _field(banner, "region") == "eu-west-1"
    assert _exports(banner)["AWS_REGION"] == "eu-west-1"
    assert _field(banner, "user") == "cli_user"
    assert "user=cli_user dbname=app" in "\n".join(banner)
    assert _field(banner, "backend").startswith(f"127.0.0.1:{existing_server.port} ")
    emulate.proc.send_signal(signal.SIGTERM)
    code, rest, stderr = emulate.finish()
    assert (code, rest, stderr) == (0, ["stopped"], "")
    with psycopg.connect(existing_server.dsn) as conn:
        row = conn.execute("SELECT rolcanlogin FROM pg_roles WHERE rolname = 'cli_user'")
        assert row.fetchone() == (True,)


@pytest.mark.parametrize("dsn", ["not a dsn", "host=127.0.0.1 port=notaport"])
def test_bad_backend_dsn_is_a_usage_error(run_emulate: Launch, dsn: str) -> None:
    """An unparsable --backend exits 2 with one line on stderr and no traceback."""
    code, out, stderr = run_emulate(["--backend", dsn]).finish()
    assert code == 2
    assert out == []
    assert stderr.startswith("iampg emulate: error: invalid")
    assert stderr.count("\n") == 1


def test_missing_binaries_is_a_usage_error(
    run_emulate: Launch, env: dict[str, str], tmp_path: Path
) -> None:
    """Without PostgreSQL binaries (and no backend DSN) the command exits 2 and says why."""
    env["IAMPG_PG_BINDIR"] = str(tmp_path)
    code, _, stderr = run_emulate([]).finish()
    assert code == 2
    assert "IAMPG_PG_BINDIR=" in stderr
    assert stderr.count("\n") == 1


def test_unreachable_backend_is_a_runtime_failure(run_emulate: Launch) -> None:
    """A backend that cannot be reached exits 1 with one line on stderr."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    dsn = f"host=127.0.0.1 port={port} user=postgres connect_timeout=2"
    code, out, stderr = run_emulate(["--backend", dsn]).finish()
    assert code == 1
    assert out == []
    assert stderr.startswith("iampg emulate: error: could not ensure role 'postgres'")
    assert stderr.count("\n") == 1


def test_backend_from_the_environment(
    run_emulate: Launch, env: dict[str, str], backend: Backend
) -> None:
    """IAMPG_EMULATOR_BACKEND is the default backend (not a throwaway cluster of its own)."""
    env["IAMPG_EMULATOR_BACKEND"] = backend.dsn
    emulate = run_emulate([])
    banner = emulate.read_until("Ctrl-C")
    assert _field(banner, "backend").startswith(f"{backend.host}:{backend.port} user=")
    emulate.proc.send_signal(signal.SIGINT)
    assert emulate.finish()[0] == 0


# The installed command, as a user runs it (the venv's bin directory goes first on PATH).
BIN = Path(sys.executable).parent
IAMPG = BIN / "iampg"
needs_command = pytest.mark.skipif(
    not IAMPG.exists() or shutil.which("psql") is None, reason="needs the iampg and psql commands"
)


def _fresh_terminal(env: dict[str, str]) -> dict[str, str]:
    """Return a new terminal's environment: no AWS, PG or IAMPG variables, iampg on PATH.

    The AWS config files stay pointed at missing files (never a real credential).
    """
    kept = ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_EC2_METADATA_DISABLED")
    fresh = {k: v for k, v in env.items() if not k.startswith(("AWS_", "PG", "IAMPG_"))}
    fresh.update({k: env[k] for k in kept if k in env})
    fresh["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return fresh


def _second_terminal(banner: list[str], base: dict[str, str]) -> dict[str, str]:
    """Return the environment a shell has after running the banner's unset/export lines."""
    lines = [line.strip() for line in banner if line.strip().startswith(("export ", "unset "))]
    result = subprocess.run(
        ["sh", "-c", "\n".join([*lines, "exec env -0"])],
        capture_output=True,
        text=True,
        env=base,
        check=True,
        timeout=TIMEOUT,
    )
    return dict(item.split("=", 1) for item in result.stdout.split("\0") if item)


def _wait_for_stderr(emulate: Emulate, texts: list[str]) -> str:
    """Return the emulator's stderr once it contains every text (or fail after a bound)."""
    for _ in range(int(TIMEOUT / 0.1)):
        stderr = "".join(line for line in emulate.stderr if line is not None)
        if all(text in stderr for text in texts):
            return stderr
        threading.Event().wait(0.1)
    pytest.fail(f"no {texts!r} on stderr: {stderr!r}")


@needs_command
def test_banner_exports_make_bare_commands_work_in_another_terminal(
    run_emulate: Launch, env: dict[str, str], backend: Backend
) -> None:
    """After the banner's exports, bare iampg commands and plain psql connect; refusals show why.

    As a user types it: ``iampg emulate --region eu-west-1`` in one terminal, the printed
    lines in a fresh one (no AWS or PG variables), then the commands with no arguments.
    """
    env["IAMPG_EMULATOR_BACKEND"] = backend.dsn
    emulate = run_emulate(["--region", "eu-west-1"], command=[str(IAMPG), "emulate"])
    banner = emulate.read_until("Ctrl-C")
    host = _field(banner, "host name")
    assert ".eu-west-1." in host
    terminal = _second_terminal(banner, _fresh_terminal(env))
    assert terminal["IAMPG_SSLROOTCERT"] == terminal["PGSSLROOTCERT"] == _field(banner, "CA file")

    def sh(command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["sh", "-c", command],
            capture_output=True,
            text=True,
            env=terminal,
            check=False,
            timeout=TIMEOUT,
        )

    token = sh("iampg token")
    assert token.returncode == 0, token.stderr
    assert token.stdout.startswith(f"{host}:{_field(banner, 'port')}/?Action=connect&DBUser=")
    for command in ("iampg url", "iampg env", "iampg doctor"):
        result = sh(command)
        assert result.returncode == 0, (command, result.stderr)
    query = "-X -tAc 'select current_user'"
    for command in (f"iampg psql {query}", f'eval "$(iampg env)" && psql {query}'):
        result = sh(command)
        assert (result.returncode, result.stdout) == (0, "postgres\n"), (command, result.stderr)

    refused = {
        "AWS_SECRET_ACCESS_KEY=wrong iampg psql -X -c 'select 1'": "signature mismatch",
        "AWS_ACCESS_KEY_ID=AKIAI44QH8DHBEXAMPLE iampg psql -X -c 'select 1'": "unknown access key",
        """PGPASSWORD="$(iampg token -p 1234)" psql -X -c 'select 1'""": "wrong port",
    }
    for command in refused:
        assert sh(command).returncode == 2  # psql: the connection failed
    stderr = _wait_for_stderr(emulate, [f": {reason}: " for reason in refused.values()])
    assert "sign for port" in stderr
    assert "X-Amz-" not in stderr
    assert token.stdout.strip() not in stderr
    emulate.proc.send_signal(signal.SIGINT)
    assert emulate.finish()[0] == 0


def test_a_busy_port_fails_before_a_cluster_starts(run_emulate: Launch) -> None:
    """--port that is taken: exit 1 at once, saying so, and no throwaway cluster started."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code, out, stderr = run_emulate(["--port", str(port)], standin=False).finish()
    assert code == 1
    assert out == []
    assert stderr == (
        f"iampg emulate: error: cannot listen on 127.0.0.1 port {port} (Address already in use): "
        "pick another --port, or --port 0 for a free one\n"
    )


@needs_command
def test_dsql_banner_exports_work_too(
    run_emulate: Launch, env: dict[str, str], backend: Backend
) -> None:
    """With --preset dsql the exports name the DSQL host and admin; bare iampg psql logs in."""
    env["IAMPG_EMULATOR_BACKEND"] = backend.dsn
    emulate = run_emulate(["--preset", "dsql"], command=[str(IAMPG), "emulate"])
    banner = emulate.read_until("Ctrl-C")
    terminal = _second_terminal(banner, _fresh_terminal(env))
    assert terminal["PGHOST"].endswith(".dsql.us-east-1.on.aws")
    assert terminal["PGUSER"] == "admin"
    result = subprocess.run(
        ["sh", "-c", "iampg psql -X -tAc 'select current_user'"],
        capture_output=True,
        text=True,
        env=terminal,
        check=False,
        timeout=TIMEOUT,
    )
    assert (result.returncode, result.stdout) == (0, "admin\n"), result.stderr
    emulate.proc.send_signal(signal.SIGINT)
    assert emulate.finish()[0] == 0


@pytest.mark.skipif(not HAVE_EMULATOR, reason="no iampg.emulator.Emulator")
def test_door_limit_flags_reach_the_gateway(run_emulate: Launch, existing_server: Backend) -> None:
    """--max-unauthenticated 1: one idle connection holds the door, the next gets 53300."""
    emulate = run_emulate(
        [
            "--backend",
            existing_server.dsn,
            "--max-unauthenticated",
            "1",
            "--tls-timeout",
            "20",
            "--auth-timeout",
            "30",
        ],
        standin=False,
    )
    banner = emulate.read_until("Ctrl-C")
    exports = _exports(banner)
    port = int(exports["PGPORT"])
    with (
        socket.create_connection((exports["PGHOSTADDR"], port), timeout=5),
        pytest.raises(psycopg.OperationalError, match="sorry, too many clients already"),
    ):
        psycopg.connect(
            host=exports["PGHOST"],
            hostaddr=exports["PGHOSTADDR"],
            port=port,
            user="postgres",
            password="not-a-token",
            sslmode="verify-full",
            sslrootcert=exports["PGSSLROOTCERT"],
            connect_timeout=10,
        )
    emulate.proc.send_signal(signal.SIGINT)
    assert emulate.finish()[0] == 0


@pytest.mark.skipif(not HAVE_EMULATOR, reason="no iampg.emulator.Emulator")
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tls-timeout", "0"], "tls_timeout and auth_timeout must be"),
        (["--tls-timeout", "9", "--auth-timeout", "5"], "tls_timeout no more than auth_timeout"),
        (["--max-unauthenticated", "0"], "max_unauthenticated must be at least 1"),
        (["--advertise-port", "70000"], "advertise_port must be from 1 to 65535"),
    ],
)
def test_bad_door_limits_are_usage_errors(
    run_emulate: Launch, existing_server: Backend, args: list[str], message: str
) -> None:
    """A limit that cannot work exits 2 with one line saying which, before listening."""
    code, out, stderr = run_emulate(
        ["--backend", existing_server.dsn, *args], standin=False
    ).finish()
    assert code == 2, stderr
    assert out == []
    assert message in stderr
    assert stderr.count("\n") == 1


@pytest.mark.skipif(not HAVE_EMULATOR, reason="no iampg.emulator.Emulator")
def test_advertise_port_is_what_tokens_and_exports_use(
    run_emulate: Launch, existing_server: Backend
) -> None:
    """--advertise-port: the banner names it, and PGPORT and the token command use it."""
    emulate = run_emulate(
        ["--backend", existing_server.dsn, "--advertise-port", "6543"], standin=False
    )
    banner = emulate.read_until("Ctrl-C")
    assert _field(banner, "advertised").startswith("port 6543 ")
    assert _exports(banner)["PGPORT"] == "6543"
    assert any("generate-db-auth-token" in line and "--port 6543" in line for line in banner)
    emulate.proc.send_signal(signal.SIGINT)
    assert emulate.finish()[0] == 0


def _dsql_admin(banner: list[str]) -> psycopg.Connection[tuple[object, ...]]:
    """Return a connection as admin to the DSQL emulator the banner describes."""
    import botocore.session

    exports = _exports(banner)
    session = botocore.session.Session()
    session.set_credentials(exports["AWS_ACCESS_KEY_ID"], exports["AWS_SECRET_ACCESS_KEY"])
    client = session.create_client("dsql", region_name=exports["AWS_REGION"])
    token = client.generate_db_connect_admin_auth_token(exports["PGHOST"], exports["AWS_REGION"])
    return psycopg.connect(
        host=exports["PGHOST"],
        hostaddr=exports["PGHOSTADDR"],
        port=int(exports["PGPORT"]),
        user="admin",
        dbname=exports["PGDATABASE"],
        password=token,
        sslmode="verify-full",
        sslrootcert=exports["PGSSLROOTCERT"],
        connect_timeout=10,
    )


def _sqlstate(conn: psycopg.Connection[tuple[object, ...]], statement: str) -> str | None:
    """Run ``statement`` in a transaction rolled back after; return its SQLSTATE, or None."""
    try:
        conn.execute(statement)
    except psycopg.Error as exc:
        return exc.sqlstate
    finally:
        conn.rollback()
    return None


@pytest.mark.skipif(not IAMPG.exists(), reason="needs the iampg command")
@pytest.mark.usefixtures("quiet_botocore")
@pytest.mark.parametrize(
    ("flags", "off", "savepoint", "truncate", "isolation"),
    [
        pytest.param([], None, "0A000", "0A000", "repeatable read", id="all-on"),
        pytest.param(
            ["--dsql-off", "sql"],
            (
                "savepoint, foreign-keys, triggers, temporary-tables, truncate, listen-notify, "
                "extensions, sequences, one-ddl, ddl-dml-mix"
            ),
            None,
            None,
            "repeatable read",
            id="sql",
        ),
        pytest.param(
            ["--dsql-off", "savepoint,OCC"],
            "savepoint, occ",
            None,
            "0A000",
            "read committed",
            id="savepoint-and-occ",
        ),
        pytest.param(
            ["--dsql-off", "all"],
            None,  # every rule: the banner lists them all
            None,
            None,
            "read committed",
            id="all",
        ),
    ],
)
def test_dsql_off_turns_dsql_rules_off(  # noqa: PLR0917
    run_emulate: Launch,
    existing_server: Backend,
    flags: list[str],
    off: str | None,
    savepoint: str | None,
    truncate: str | None,
    isolation: str,
) -> None:
    """``iampg emulate --preset dsql --dsql-off ...``: those refusals and OCC are gone."""
    existing_server.ensure_role("admin", superuser=True)
    with psycopg.connect(existing_server.dsn, autocommit=True) as owner:
        owner.execute("CREATE SCHEMA IF NOT EXISTS admin AUTHORIZATION admin")  # "$user"
    emulate = run_emulate(
        ["--backend", existing_server.dsn, "--preset", "dsql", *flags],
        command=[str(IAMPG), "emulate"],
    )
    banner = emulate.read_until("Ctrl-C")
    rules = [line.strip() for line in banner if "DSQL rules off:" in line]
    if flags == ["--dsql-off", "all"]:
        assert rules == [f"DSQL rules off: {', '.join(f.replace('_', '-') for f in FIELDS)}"]
    else:
        assert rules == ([f"DSQL rules off: {off}"] if off else [])
    with _dsql_admin(banner) as conn:
        assert _sqlstate(conn, "SAVEPOINT s1") == savepoint
        table = f"t_{os.getpid()}_{len(flags)}"
        conn.execute(f"CREATE TABLE IF NOT EXISTS {table} (id int PRIMARY KEY)")
        conn.commit()
        try:
            assert _sqlstate(conn, f"TRUNCATE {table}") == truncate
            assert conn.execute("SHOW transaction_isolation").fetchone() == (isolation,)
            conn.rollback()
        finally:
            conn.execute(f"DROP TABLE {table}")
            conn.commit()
    emulate.proc.send_signal(signal.SIGINT)
    assert emulate.finish()[0] == 0


FIELDS = [field.name for field in dataclasses.fields(iampg.emulator.DsqlRules)]


@pytest.mark.parametrize("preset", [[], ["--preset", "rds"], ["--preset", "aurora-serverless"]])
def test_dsql_off_is_refused_outside_dsql(run_emulate: Launch, preset: list[str]) -> None:
    """RDS presets refuse no statement: --dsql-off there is a usage error, before any cluster."""
    code, out, stderr = run_emulate([*preset, "--dsql-off", "sql"], standin=False).finish()
    assert code == 2
    assert out == []
    assert stderr == (
        "iampg emulate: error: --dsql-off applies to --preset dsql only: "
        "the RDS presets refuse no statement\n"
    )


def test_dsql_off_names_an_unknown_rule(run_emulate: Launch) -> None:
    """A misspelt rule is argparse's usage error, listing the rules."""
    code, out, stderr = run_emulate(["--preset", "dsql", "--dsql-off", "sql,savepoints"]).finish()
    assert code == 2
    assert out == []
    assert "argument --dsql-off: unknown DSQL rule 'savepoints' (choose from sql, all, " in stderr
    assert "role-mapping)" in stderr
