"""Tests of the emulator's PostgreSQL backend: temporary clusters and existing servers."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest

from iampg.emulator import _backend
from iampg.emulator._backend import Backend, BackendConfigError, BackendError
from iampg.errors import ConfigurationError, Error

if TYPE_CHECKING:
    from collections.abc import Iterator

LOCAL_DSN = os.environ.get(
    "IAMPG_TEST_LOCAL_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _select_one(conninfo: str) -> object:
    with psycopg.connect(conninfo, connect_timeout=5) as conn:
        row = conn.execute("SELECT 1").fetchone()
        assert row is not None
        return row[0]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Backend]:
    with Backend.temporary() as backend:
        yield backend


@pytest.fixture
def local_server() -> str:
    try:
        _select_one(LOCAL_DSN + " connect_timeout=3")
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL at {LOCAL_DSN}: {exc}")
    return LOCAL_DSN


@pytest.mark.slow
def test_temporary_answers_on_tcp_and_unix_socket(cluster: Backend) -> None:
    """A temporary cluster accepts connections on 127.0.0.1 and on its socket directory."""
    assert cluster.kind == "temporary"
    assert cluster.host == "127.0.0.1"
    assert cluster.user == "postgres"
    assert cluster.password is None
    assert _select_one(cluster.dsn) == 1
    assert cluster.socket_dir is not None
    assert Path(cluster.socket_dir, f".s.PGSQL.{cluster.port}").exists()
    with psycopg.connect(cluster.conninfo(host=str(cluster.socket_dir))) as conn:
        row = conn.execute("SELECT inet_server_addr() IS NULL").fetchone()
    assert row == (True,)  # NULL server address: a unix-socket session


@pytest.mark.slow
def test_temporary_ignores_exported_hostaddr_and_sslmode(monkeypatch: pytest.MonkeyPatch) -> None:
    """PGHOSTADDR and PGSSLMODE exported for an emulated endpoint do not break a throwaway one."""
    monkeypatch.setenv("PGHOSTADDR", "127.0.0.2")
    monkeypatch.setenv("PGSSLMODE", "verify-full")
    with Backend.temporary() as backend:
        assert _select_one(backend.dsn) == 1


def test_temporary_runs_unprivileged_in_a_private_directory(cluster: Backend) -> None:
    """As root the server runs as another user; its directory is private to that user."""
    assert cluster.socket_dir is not None
    st = cluster.socket_dir.stat()
    assert st.st_mode & 0o777 == 0o700
    assert cluster.pid is not None
    uid = Path(f"/proc/{cluster.pid}").stat().st_uid if Path("/proc").is_dir() else st.st_uid
    if os.geteuid() == 0:
        assert uid != 0
        assert st.st_uid == uid
    else:
        assert uid == os.geteuid()


def test_temporary_has_speed_settings(cluster: Backend) -> None:
    """Durability is off and the connection limit raised, as the emulator's tests need."""
    with psycopg.connect(cluster.dsn) as conn:
        settings: dict[str, str] = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)",
                (["fsync", "synchronous_commit", "full_page_writes", "max_connections"],),
            ).fetchall()
        )
        encoding = conn.execute("SHOW server_encoding").fetchone()
    assert settings == {
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "max_connections": "210",
    }
    assert encoding == ("UTF8",)


def test_ensure_role_is_idempotent(cluster: Backend) -> None:
    """ensure_role creates a login role once and leaves an existing one alone."""
    name = 'iam "user"-1'  # needs quoting as an identifier
    cluster.ensure_role(name)
    cluster.ensure_role(name)
    cluster.ensure_role("iam_admin", superuser=True)
    cluster.ensure_role("iam_admin", superuser=True)
    with psycopg.connect(cluster.dsn) as conn:
        rows = conn.execute(
            "SELECT rolname, rolcanlogin, rolsuper FROM pg_roles WHERE rolname = ANY(%s) "
            "ORDER BY rolname",
            ([name, "iam_admin"],),
        ).fetchall()
    assert rows == [(name, True, False), ("iam_admin", True, True)]
    assert _select_one(cluster.conninfo(user=name)) == 1


@pytest.mark.slow
def test_stop_shuts_down_and_removes_the_directory() -> None:
    """stop() ends the postmaster, deletes the temporary directory, and may be repeated."""
    backend = Backend.temporary()
    pid, tempdir = backend.pid, backend.socket_dir
    assert pid is not None
    assert tempdir is not None
    assert _alive(pid)
    assert f"pid={pid}" in repr(backend)
    backend.stop()
    assert not _alive(pid)
    assert not tempdir.exists()
    backend.stop()
    assert "stopped" in repr(backend)
    with pytest.raises(psycopg.OperationalError):
        _select_one(backend.dsn + " connect_timeout=2")


@pytest.mark.slow
def test_context_manager_stops() -> None:
    """Leaving the with block stops a temporary cluster."""
    with Backend.temporary() as backend:
        tempdir = backend.socket_dir
        assert tempdir is not None
        assert tempdir.exists()
    assert not tempdir.exists()


@pytest.mark.slow
def test_exit_without_stop_cleans_up() -> None:
    """A process that never calls stop() still leaves no cluster behind at exit."""
    code = (
        "from iampg.emulator._backend import Backend\n"
        "b = Backend.temporary()\n"
        "print(b.pid, b.socket_dir, flush=True)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    pid, tempdir = result.stdout.split()
    assert not _alive(int(pid))
    assert not Path(tempdir).exists()


@pytest.mark.slow
def test_orphaned_clusters_are_reaped() -> None:
    """A cluster directory whose owner process died is removed by the next temporary()."""
    with subprocess.Popen([sys.executable, "-c", "pass"]) as proc:
        proc.wait(timeout=30)  # its pid now names a dead process
    orphan = Path(tempfile.mkdtemp(prefix="iampg-pg-", dir=tempfile.gettempdir()))
    (orphan / "owner.pid").write_text(f"{proc.pid}\n", encoding="ascii")
    (orphan / "data").mkdir()
    mine = Path(tempfile.mkdtemp(prefix="iampg-pg-", dir=tempfile.gettempdir()))
    (mine / "owner.pid").write_text(f"{os.getpid()}\n", encoding="ascii")
    try:
        with Backend.temporary():
            assert not orphan.exists()
            assert mine.exists()  # its owner (this process) is alive
    finally:
        for path in (orphan, mine):
            shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
def test_failed_start_reports_the_server_log_and_cleans_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A port already taken makes temporary(port=...) fail with the log's tail, leaving nothing."""
    # Its own cluster directory, not every iampg-pg-* one: other test runs make theirs meanwhile.
    made: list[Path] = []
    make_tempdir = _backend._make_tempdir

    def recording(*args: Any, **kwargs: Any) -> Path:
        made.append(make_tempdir(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(_backend, "_make_tempdir", recording)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(BackendError, match="could not bind") as info:
            Backend.temporary(port=port)
    assert isinstance(info.value, Error)
    assert "server log" in str(info.value)
    assert len(made) == 1
    assert not made[0].exists()


def test_explicit_bindir_without_binaries_is_a_configuration_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bindir argument or IAMPG_PG_BINDIR without initdb/postgres is reported, not skipped."""
    with pytest.raises(BackendConfigError, match="bindir="):
        Backend.temporary(bindir=tmp_path)
    monkeypatch.setenv("IAMPG_PG_BINDIR", str(tmp_path))
    with pytest.raises(ConfigurationError, match="IAMPG_PG_BINDIR="):
        Backend.temporary()


def test_find_bindir_prefers_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """IAMPG_PG_BINDIR wins over the automatic search when it holds the binaries."""
    for name in ("initdb", "postgres"):
        (tmp_path / name).write_text("#!/bin/sh\n", encoding="ascii")
        (tmp_path / name).chmod(0o755)
    monkeypatch.setenv("IAMPG_PG_BINDIR", str(tmp_path))
    assert _backend.find_bindir() == tmp_path


def test_from_dsn_parses_and_hides_the_password() -> None:
    """from_dsn accepts a URL, normalises it to key=value, and keeps the password out of repr."""
    backend = Backend.from_dsn("postgresql://alice:s3cret@db.example:6543/app?sslmode=disable")
    assert (backend.host, backend.port, backend.user, backend.dbname) == (
        "db.example",
        6543,
        "alice",
        "app",
    )
    assert backend.password == "s3cret"
    assert backend.kind == "dsn"
    assert "host=db.example" in backend.dsn
    assert "://" not in backend.dsn
    assert "s3cret" not in repr(backend)
    backend.stop()  # nothing to do, nothing dialled


@pytest.mark.parametrize("dsn", ["not a dsn", "host=x port=abc"])
def test_from_dsn_rejects_a_bad_dsn(dsn: str) -> None:
    """An unparsable DSN is a configuration error."""
    with pytest.raises(BackendConfigError):
        Backend.from_dsn(dsn)


def test_from_dsn_leaves_the_server_running(local_server: str) -> None:
    """stop() on an existing server's backend does not touch the server."""
    with Backend.from_dsn(local_server) as backend:
        assert _select_one(backend.dsn) == 1
    backend.stop()
    assert _select_one(local_server) == 1


def test_auto_uses_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto() returns the DSN in IAMPG_EMULATOR_BACKEND without starting anything."""
    monkeypatch.setenv("IAMPG_EMULATOR_BACKEND", "host=db.example port=5439 user=bob")
    backend = Backend.auto()
    assert backend.kind == "dsn"
    assert (backend.host, backend.port, backend.user) == ("db.example", 5439, "bob")


@pytest.mark.parametrize(
    ("operation", "name"), [("ensure_role", "alice"), ("terminate_sessions", "worker")]
)
def test_an_unreachable_server_raises_backend_error(operation: str, name: str) -> None:
    """A connection failure in ensure_role or terminate_sessions is a BackendError naming
    the role or application."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    backend = Backend.from_dsn(f"host=127.0.0.1 port={port} user=postgres connect_timeout=2")
    with pytest.raises(BackendError, match=name):
        getattr(backend, operation)(name)


def test_terminate_sessions_ends_only_that_application(cluster: Backend) -> None:
    """terminate_sessions ends the named application's sessions and leaves the others."""
    with (
        psycopg.connect(cluster.conninfo(application_name="doomed")) as doomed,
        psycopg.connect(cluster.conninfo(application_name="spared")) as spared,
    ):
        assert cluster.terminate_sessions("doomed") == 1
        with pytest.raises(psycopg.OperationalError):
            doomed.execute("SELECT 1")
        assert spared.execute("SELECT 1").fetchone() == (1,)
        assert cluster.terminate_sessions("nobody") == 0
