"""Off loopback nobody gets in for free; the command; stopping with a grace period."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from iampg import ConfigurationError, Endpoint
from iampg.cli import main
from iampg.emulator import Emulator
from iampg.proxy import Proxy
from proxy_support import ProxyFactory, eventually
from secret_guard import SENTINEL_PASSWORD, SecretGuard

AWS_HOST = "mydb.cluster-abc123.us-east-1.rds.amazonaws.com"

# Keep botocore's DEBUG lines (which show signatures) out of failure reports.
pytestmark = pytest.mark.usefixtures("quiet_botocore")


@pytest.mark.parametrize(
    ("options", "missing"),
    [
        ({}, "TLS towards clients and a client password (SCRAM-SHA-256), or"),
        ({"client_tls": "generate"}, "it needs a client password (SCRAM-SHA-256), or"),
        ({"password": SENTINEL_PASSWORD}, "it needs TLS towards clients, or"),
    ],
)
@pytest.mark.parametrize("host", ["0.0.0.0", ""])
def test_beyond_loopback_needs_tls_and_a_password(
    host: str, options: dict[str, str], missing: str
) -> None:
    """Listening beyond loopback without client TLS and a password: refused, nothing bound."""
    with pytest.raises(ConfigurationError, match=re.escape(missing)):
        Proxy(Endpoint(AWS_HOST, user="app"), host=host, **options)  # type: ignore[arg-type]


def test_loopback_needs_neither() -> None:
    """On loopback (by address or name) neither is required."""
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        Proxy(Endpoint(AWS_HOST, user="app"), host=host)


def test_beyond_loopback_with_both_serves_tls_and_scram(
    emulator_endpoint: Endpoint, start_proxy: ProxyFactory
) -> None:
    """With a generated certificate and a password, a client verifies the proxy and logs in."""
    proxy = start_proxy(
        emulator_endpoint,
        host="0.0.0.0",
        client_tls="generate",
        password=SENTINEL_PASSWORD,
    )
    assert proxy.ca_file is not None
    assert proxy.host == "127.0.0.1"
    tls = f"sslmode=verify-full sslrootcert={proxy.ca_file}"
    with psycopg.connect(f"{proxy.conninfo} {tls}", password=SENTINEL_PASSWORD) as conn:
        assert conn.execute("select ssl from pg_stat_ssl where pid = pg_backend_pid()")
        assert conn.info.pgconn.ssl_in_use
        assert conn.execute("select 1").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(f"{proxy.conninfo} {tls}", password="not-the-password")
    with pytest.raises(psycopg.OperationalError, match="no password supplied"):
        psycopg.connect(f"{proxy.conninfo} {tls}")


def test_a_given_certificate_and_direct_tls(
    emulator_endpoint: Endpoint, start_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """A certificate and key given as files; libpq's direct TLS (ALPN) works too."""
    from iampg.emulator._tls import make_certificates

    files = make_certificates(["localhost"], tmp_path, loopback=True)
    proxy = start_proxy(
        emulator_endpoint,
        client_tls=(files.cert_file, files.key_file),
        password=SENTINEL_PASSWORD,
    )
    tls = f"sslmode=verify-full sslrootcert={files.ca_file}"
    with psycopg.connect(f"{proxy.conninfo} {tls}", password=SENTINEL_PASSWORD) as conn:
        assert conn.info.pgconn.ssl_in_use
    if psycopg.pq.version() < 170000:
        pytest.skip("libpq older than 17 has no sslnegotiation=direct")
    direct = f"{proxy.conninfo} {tls} sslnegotiation=direct"
    with psycopg.connect(direct, password=SENTINEL_PASSWORD) as conn:
        assert conn.execute("select 'direct'").fetchone() == ("direct",)


def test_the_command_refuses_to_listen_beyond_loopback_unprotected(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``iampg proxy --listen 0.0.0.0`` without TLS and password exits 2, saying why."""
    code = main(["proxy", AWS_HOST, "-U", "app", "--listen", "0.0.0.0"])
    assert code == 2
    assert "needs TLS towards clients and a client password" in capsys.readouterr().err


def test_the_command_takes_no_password_on_its_command_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """There is no --password option: a password on a command line is visible to all."""
    code = main(["proxy", AWS_HOST, "-U", "app", "--password", SENTINEL_PASSWORD])
    assert code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


@pytest.fixture
def run_command(emulator: Emulator) -> Iterator[list[subprocess.Popen[str]]]:
    """Collect ``iampg proxy`` processes; kill any left running after the test."""
    running: list[subprocess.Popen[str]] = []
    yield running
    for process in running:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=30)


def _command(emulator: Emulator, *extra: str, env: dict[str, str] | None = None) -> list[str]:
    target = (
        f"host={emulator.host} hostaddr=127.0.0.1 port={emulator.port} user=postgres "
        f"dbname=postgres sslrootcert={emulator.ca_file}"
    )
    del env
    return [sys.executable, "-m", "iampg", "proxy", target, *extra]


def _start(
    running: list[subprocess.Popen[str]], argv: list[str], env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    running.append(process)
    return process


def _no_secret(guard: SecretGuard, text: str) -> None:
    assert "X-Amz-Signature" not in text
    assert "X-Amz-Credential" not in text
    assert not guard.leaks_in(text)


def test_the_command_serves_logs_and_stops_on_sigterm(
    emulator: Emulator,
    run_command: list[subprocess.Popen[str]],
    secret_guard: SecretGuard,
    event_loop_kind: str,
) -> None:
    """First line: the conninfo; JSON session lines on stderr; SIGTERM: exit 0. No secret."""
    argv = _command(
        emulator, "--log-format", "json", "--grace", "0", "--event-loop", event_loop_kind
    )
    process = _start(run_command, argv)
    assert process.stdout is not None
    conninfo = process.stdout.readline().strip()
    assert conninfo.startswith("host=127.0.0.1 port=")
    assert conninfo.endswith(" user=postgres dbname=postgres hostaddr=127.0.0.1 sslmode=disable")
    with psycopg.connect(conninfo, application_name="cli") as conn:
        assert conn.execute("select current_setting('application_name')").fetchone() == ("cli",)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0
    events = [json.loads(line) for line in err.splitlines()]
    closed = [e for e in events if e.get("event") == "session closed"]
    assert len(closed) == 1, err
    assert closed[0]["user"] == "postgres"
    assert closed[0]["database"] == "postgres"
    assert closed[0]["outcome"] == "client closed"
    assert closed[0]["bytes_from_client"] > 0
    assert closed[0]["bytes_to_client"] > 0
    assert [e["event"] for e in events] == [
        "proxy listening",
        "session opened",
        "session closed",
        "proxy stopped",
    ]
    assert events[0]["event_loop"] == event_loop_kind
    _no_secret(secret_guard, out + err)


def test_the_command_serves_several_endpoints_with_a_password_and_tls(
    emulator: Emulator, run_command: list[subprocess.Popen[str]], secret_guard: SecretGuard
) -> None:
    """Two endpoints, one port each; password from the environment; the generated CA printed."""
    other = (
        f"host={emulator.host} hostaddr=127.0.0.1 port={emulator.port} user=postgres "
        f"sslrootcert={emulator.ca_file}"
    )
    argv = _command(
        emulator, "--endpoint", other, "--tls-generate", "--grace", "0", "--log-format", "json"
    )
    process = _start(run_command, argv, env={"IAMPG_PROXY_PASSWORD": SENTINEL_PASSWORD})
    assert process.stdout is not None
    first = process.stdout.readline().strip()
    second = process.stdout.readline().strip()
    assert first != second
    for conninfo in (first, second):
        assert " sslmode=verify-full sslrootcert=" in conninfo
        with psycopg.connect(conninfo, password=SENTINEL_PASSWORD) as conn:
            assert conn.info.pgconn.ssl_in_use
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(first, password="not-the-password")  # a record of its own
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0
    events = [json.loads(line) for line in err.splitlines()]  # JSON only
    assert all("event" in event for event in events), err
    assert any(e["event"] == "log" and "wrong password" in e["message"] for e in events), err
    generated = [e for e in events if e["event"] == "generated certificate"]
    assert len(generated) == 2, err
    for event, conninfo in zip(generated, (first, second), strict=True):
        assert event["ca_pem"].startswith("-----BEGIN CERTIFICATE-----")
        assert f"sslrootcert={event['ca_file']}" in conninfo
    ports = {int(re.search(r"port=(\d+)", c)[1]) for c in (first, second)}  # type: ignore[index]
    assert {e["port"] for e in events if e["event"] == "proxy stopped"} == ports, err
    _no_secret(secret_guard, out + err)


def test_stop_lets_open_sessions_finish_within_the_grace_period(
    emulator_endpoint: Endpoint, start_proxy: ProxyFactory
) -> None:
    """After stop(): no new connection is accepted, an open session works on until it ends."""
    proxy = start_proxy(emulator_endpoint, grace=60.0)
    port = proxy.port
    with psycopg.connect(proxy.conninfo) as conn:
        stopper = threading.Thread(target=proxy.stop)
        stopper.start()

        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:
                return True
            return False

        assert eventually(refused)
        assert conn.execute("select 'in grace'").fetchone() == ("in grace",)
        assert stopper.is_alive()
    stopper.join(timeout=30)
    assert not stopper.is_alive()


def test_a_second_signal_ends_the_grace_period(
    emulator: Emulator, run_command: list[subprocess.Popen[str]]
) -> None:
    """SIGTERM starts a long grace period; a second one closes the open sessions at once."""
    process = _start(run_command, _command(emulator, "--grace", "600"))
    assert process.stdout is not None
    conninfo = process.stdout.readline().strip()
    with psycopg.connect(conninfo) as conn:
        process.send_signal(signal.SIGTERM)
        assert conn.execute("select 'in grace'").fetchone() == ("in grace",)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
        assert process.returncode == 0, err
        with pytest.raises(psycopg.OperationalError):
            conn.execute("select 1")
    assert "outcome=shutdown" in err


def test_exit_codes_of_the_command(emulator: Emulator, tmp_path: Path) -> None:
    """A taken port exits 1; a Unix socket directory that does not exist exits 2."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = _command(emulator, "--port", str(port))
        busy = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert busy.returncode == 1, busy.stderr
    assert "Address already in use" in busy.stderr
    argv = _command(emulator, "--unix-socket", str(tmp_path / "missing"))
    missing = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert missing.returncode == 2, missing.stderr
    assert "does not exist" in missing.stderr


def test_the_password_comes_from_one_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--password-file or IAMPG_PROXY_PASSWORD, not both; an empty file is refused."""
    empty = tmp_path / "empty"
    empty.write_text("\n")
    base = ["proxy", AWS_HOST, "-U", "app", "--password-file"]
    assert main([*base, str(empty)]) == 2
    assert "is empty" in capsys.readouterr().err
    given = tmp_path / "password"
    given.write_text(SENTINEL_PASSWORD + "\n")
    monkeypatch.setenv("IAMPG_PROXY_PASSWORD", SENTINEL_PASSWORD)
    assert main([*base, str(given)]) == 2
    assert "not both" in capsys.readouterr().err
