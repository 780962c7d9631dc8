"""Verified TLS by default: the shipped CA file for every service, and a machine in the middle.

The machine in the middle is a TLS server on 127.0.0.2 whose certificate names another host;
it asks for a cleartext password, as RDS does, and records any password it receives. No
default path may hand it a token; ``sslmode=require``, the documented opt-out, does.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import psycopg_pool
import pytest
from psycopg.conninfo import conninfo_to_dict

import iampg
from iampg import Endpoint, TokenProvider, _trust
from iampg.cli import main
from iampg.emulator import Backend, Emulator
from iampg.emulator._tls import make_certificates, server_context
from iampg.integrations import sqlalchemy as iampg_sqlalchemy

HOST = "mydb.cluster-abc.us-east-1.rds.amazonaws.com"
_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104


class Mitm:
    """A TLS server on 127.0.0.2 with a certificate for another name; records passwords."""

    def __init__(self, directory: Path) -> None:
        self.files = make_certificates(["evil.example.com"], directory)
        self.context = server_context(self.files)
        self.passwords: list[str] = []
        self.handshakes = 0
        self._stop = threading.Event()
        self._sock = socket.create_server(("127.0.0.2", 0))
        self._sock.settimeout(0.1)
        self.port: int = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name="mitm", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5.0)
                # A client that gave up (a failed verification) is what we hope for.
                with contextlib.suppress(OSError, ssl.SSLError, struct.error):
                    self._handle(conn)

    def _handle(self, conn: socket.socket) -> None:
        for _ in range(3):  # a GSSENCRequest may come first
            length, code = struct.unpack("!ii", _read(conn, 8))
            if code == _GSSENC_REQUEST:
                conn.sendall(b"N")
                continue
            break
        if code != _SSL_REQUEST:
            return
        conn.sendall(b"S")
        with self.context.wrap_socket(conn, server_side=True) as tls:
            self.handshakes += 1
            (length,) = struct.unpack("!i", _read(tls, 4))
            _read(tls, length - 4)  # the startup message
            tls.sendall(b"R" + struct.pack("!ii", 8, 3))  # AuthenticationCleartextPassword
            kind = _read(tls, 1)
            (length,) = struct.unpack("!i", _read(tls, 4))
            payload = _read(tls, length - 4)
            if kind == b"p":
                self.passwords.append(payload.rstrip(b"\0").decode())
            fields = b"SFATAL\0C28000\0Mthe machine in the middle says no\0\0"
            tls.sendall(b"E" + struct.pack("!i", len(fields) + 4) + fields)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self._sock.close()


def _read(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


@pytest.fixture
def mitm(tmp_path: Path) -> Iterator[Mitm]:
    """A machine in the middle on 127.0.0.2."""
    server = Mitm(tmp_path)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def trusted_mitm(mitm: Mitm, monkeypatch: pytest.MonkeyPatch) -> Mitm:
    """The same, with its CA trusted (IAMPG_SSLROOTCERT): only the name is wrong."""
    monkeypatch.setenv(_trust.ENV_VAR, str(mitm.files.ca_file))
    return mitm


def _endpoint(mitm: Mitm, **params: str) -> Endpoint:
    return Endpoint(HOST, user="app", hostaddr="127.0.0.2", port=mitm.port, **params)


def test_every_service_defaults_to_verify_full_with_the_shipped_ca_file() -> None:
    """RDS, Aurora, RDS Proxy and DSQL get verify-full with a CA file from iampg's store."""
    for host in (
        HOST,
        "mydb.abc.us-east-1.rds.amazonaws.com",
        "myproxy.proxy-abc.us-east-1.rds.amazonaws.com",
        "abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws",
    ):
        ep = Endpoint(host, user="app")
        params = conninfo_to_dict(iampg.conninfo(provider=TokenProvider(ep)))
        assert params["sslmode"] == "verify-full"
        assert params["sslrootcert"] == str(_trust.root_file(ep))
        assert Path(str(params["sslrootcert"])).is_file()


def test_sslrootcert_given_wins_and_require_is_an_opt_out(tmp_path: Path) -> None:
    """A caller's sslrootcert is kept; sslmode=require gets no CA file (libpq's verify-ca)."""
    mine = tmp_path / "ca.pem"
    mine.write_text("")
    ep = Endpoint(HOST, user="app", sslrootcert=str(mine))
    assert iampg.env(ep)["PGSSLROOTCERT"] == str(mine)
    assert iampg.env(ep)["PGSSLMODE"] == "verify-full"
    opted_out = iampg.env(Endpoint(HOST, user="app", sslmode="require"))
    assert opted_out["PGSSLMODE"] == "require"
    assert "PGSSLROOTCERT" not in opted_out


def test_connect_hands_no_token_to_a_certificate_for_another_name(trusted_mitm: Mitm) -> None:
    """connect() verifies the name: the handshake fails, no password is sent."""
    with pytest.raises(psycopg.OperationalError, match="did not verify as") as info:
        iampg.connect(_endpoint(trusted_mitm))
    assert "IAMPG_SSLROOTCERT" in str(info.value)
    assert trusted_mitm.passwords == []


def test_connect_names_the_shipped_ca_set_and_its_age(mitm: Mitm) -> None:
    """Against the shipped store the error names the CA set, when it was built, how to renew."""
    with pytest.raises(psycopg.OperationalError) as info:
        iampg.connect(_endpoint(mitm))
    text = str(info.value)
    summary = _trust.describe(_trust.root_file(_endpoint(mitm)))
    assert summary is not None
    assert summary in text
    assert "IAMPG_SSLROOTCERT" in text
    assert mitm.passwords == []


def test_pool_hands_no_token_to_the_machine_in_the_middle(trusted_mitm: Mitm) -> None:
    """A default pool's connection attempts fail verification; no password is sent."""
    with (
        iampg.ConnectionPool(
            _endpoint(trusted_mitm), min_size=0, max_size=1, timeout=2.0, open=False
        ) as pool,
        pytest.raises(psycopg_pool.PoolTimeout),
        pool.connection(),
    ):
        pass
    assert trusted_mitm.passwords == []


def test_sqlalchemy_hands_no_token_to_the_machine_in_the_middle(trusted_mitm: Mitm) -> None:
    """A default SQLAlchemy engine fails verification; no password is sent."""
    import sqlalchemy

    engine = iampg_sqlalchemy.create_engine(_endpoint(trusted_mitm))
    with pytest.raises(sqlalchemy.exc.OperationalError, match="did not verify"), engine.connect():
        pass
    engine.dispose()
    assert trusted_mitm.passwords == []


def test_cli_url_hands_no_token_to_the_machine_in_the_middle(
    trusted_mitm: Mitm, capsys: pytest.CaptureFixture[str]
) -> None:
    """`iampg url` output carries verify-full and the CA file: psycopg refuses the server."""
    args = [
        "url",
        HOST,
        "--user",
        "app",
        "--hostaddr",
        "127.0.0.2",
        "--port",
        str(trusted_mitm.port),
    ]
    assert main(args) == 0
    url = capsys.readouterr().out.strip()
    with pytest.raises(psycopg.OperationalError, match="does not match host name"):
        psycopg.connect(url, connect_timeout=5)
    assert trusted_mitm.passwords == []


def test_explicit_require_is_the_opt_out_that_hands_over_the_token(trusted_mitm: Mitm) -> None:
    """sslmode=require encrypts without checking who answers: the token reaches the MITM."""
    provider = TokenProvider(_endpoint(trusted_mitm, sslmode="require"))
    with pytest.raises(psycopg.OperationalError, match="the machine in the middle says no"):
        iampg.connect(provider=provider, wait=0)
    assert trusted_mitm.passwords == [provider.token()]


@pytest.fixture
def dsql(backend: Backend) -> Iterator[Emulator]:
    """A DSQL emulator whose admin role exists on the backend."""
    backend.ensure_role("admin")
    with Emulator(backend.dsn, service="dsql") as emu:
        yield emu


@pytest.mark.skipif(shutil.which("psql") is None, reason="needs the psql program")
def test_iampg_psql_to_dsql_works_with_the_psql_that_runs(dsql: Emulator) -> None:
    """`iampg psql` to DSQL verifies with a CA file, which psql of any version reads."""
    env = {**os.environ, _trust.ENV_VAR: str(dsql.ca_file)}
    args = [dsql.host, "--hostaddr", dsql.listen_host, "--port", str(dsql.port)]
    args += ["--region", dsql.region]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "iampg.cli",
            "psql",
            *args,
            "--",
            "-X",
            "-A",
            "-t",
            "-c",
            "select 1",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env=env,
    )
    assert (result.returncode, result.stdout.strip()) == (0, "1"), result.stderr
    version = subprocess.run(
        ["psql", "--version"], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    assert "PostgreSQL" in version  # the run above used this psql's libpq


def test_integrations_default_to_the_shipped_ca_file() -> None:
    """Django's OPTIONS and asyncpg's SSL context verify with the endpoint's shipped CA file."""
    from iampg.integrations import asyncpg as iampg_asyncpg
    from iampg.integrations.django import database

    ep = Endpoint(HOST, user="app")
    options = database(ep)["OPTIONS"]
    root = str(_trust.root_file(ep))
    assert (options["sslmode"], options["sslrootcert"]) == ("verify-full", root)
    context = iampg_asyncpg.connect_kwargs(ep)["ssl"]
    assert isinstance(context, ssl.SSLContext)
    assert (context.verify_mode, context.check_hostname) == (ssl.CERT_REQUIRED, True)
    expected = ssl.create_default_context(cafile=root).get_ca_certs()
    assert context.get_ca_certs() == expected


def test_asyncpg_hands_no_token_to_the_machine_in_the_middle(trusted_mitm: Mitm) -> None:
    """asyncpg's default context refuses the name, and the error says which CA set was used."""
    import asyncio

    from iampg.integrations import asyncpg as iampg_asyncpg

    with pytest.raises(ssl.SSLCertVerificationError, match="IAMPG_SSLROOTCERT") as info:
        asyncio.run(iampg_asyncpg.connect(_endpoint(trusted_mitm)))
    assert str(trusted_mitm.files.ca_file) in str(info.value)
    assert trusted_mitm.passwords == []
