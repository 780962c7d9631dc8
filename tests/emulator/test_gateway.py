"""Tests of the RDS-mode gateway: real libpq clients, a real PostgreSQL behind it."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import botocore.session
import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg import errors as pg_errors

import iampg
from iampg import TokenProvider
from iampg.emulator import FAKE_CREDENTIALS, Credentials, Emulator, EmulatorClock, Event
from iampg.emulator._gateway import _ProtocolViolationError, _startup_parameters
from iampg.errors import ConfigurationError
from support import (
    EmulatorFactory,
    endpoint_for,
    examples,
    open_sockets,
    sessions_left,
    sessions_of,
)

LIBPQ = psycopg.pq.version()  # the libpq psycopg runs on, e.g. 170005 or 180001

if TYPE_CHECKING:
    from iampg.emulator import Backend

PAM = 'PAM authentication failed for user "postgres"'
OTHER = Credentials("AKIAOTHEREXAMPLE0000", "other-secret-key")


def _tampered(token: str) -> str:
    """Return ``token`` with the last character of its signature changed."""
    return token[:-1] + ("0" if token[-1] != "0" else "1")


def mint(
    emu: Emulator,
    *,
    user: str = "postgres",
    host: str | None = None,
    port: int | None = None,
    region: str | None = None,
    creds: Credentials | None = None,
) -> str:
    """Return a token botocore signs for the emulator (or for the given wrong details)."""
    creds = creds or emu.credentials
    session = botocore.session.get_session()
    session.set_credentials(creds.access_key_id, creds.secret_access_key, creds.session_token)
    client = session.create_client("rds", region_name=region or emu.region)
    token: str = client.generate_db_auth_token(
        host or emu.host, port or emu.port, user, region or emu.region
    )
    return token


def connect(
    emu: Emulator, token: str, user: str = "postgres", **kwargs: Any
) -> psycopg.Connection[Any]:
    return psycopg.connect(emu.conninfo(user, password=token), connect_timeout=5, **kwargs)


def refused(emu: Emulator, token: str, user: str = "postgres", **kwargs: Any) -> str:
    with pytest.raises(psycopg.OperationalError) as info:
        connect(emu, token, user, **kwargs).close()
    return str(info.value)


def last_event(emu: Emulator) -> Event:
    assert emu.events, "no authentication event was recorded"
    return emu.events[-1]


# Keep botocore's DEBUG lines (which show signatures) out of failure reports.
pytestmark = pytest.mark.usefixtures("quiet_botocore")


@pytest.fixture
def emu(start_emulator: EmulatorFactory) -> Emulator:
    """Return a running emulator on real time that knows the fake keys and OTHER."""
    return start_emulator(credentials=(FAKE_CREDENTIALS, OTHER))


def test_botocore_token_connects_with_verify_full(emu: Emulator) -> None:
    """A botocore token logs in over verify-full TLS and reaches the backend as the user."""
    with connect(emu, mint(emu)) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
        assert conn.pgconn.ssl_in_use
        assert conn.info.host == emu.host
    event = last_event(emu)
    assert (event.outcome, event.user, event.database, event.reason) == (
        "accepted",
        "postgres",
        "postgres",
        "",
    )
    assert event.peer == "127.0.0.1"


def test_session_credentials_and_aws_env(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Temporary keys from aws_env() sign tokens botocore-by-environment gets accepted."""
    creds = Credentials("ASIAEMULATOREXAMPLE0", "temporary-secret", "session/token+=")
    with Emulator(backend.dsn, credentials=[creds], region="eu-west-3") as emu:
        env = emu.aws_env()
        assert env == {
            "AWS_ACCESS_KEY_ID": creds.access_key_id,
            "AWS_SECRET_ACCESS_KEY": creds.secret_access_key,
            "AWS_SESSION_TOKEN": "session/token+=",
            "AWS_REGION": "eu-west-3",
            "AWS_DEFAULT_REGION": "eu-west-3",
        }
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        client = botocore.session.get_session().create_client("rds")
        token = client.generate_db_auth_token(emu.host, emu.port, "postgres")
        with connect(emu, token) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        no_session = Credentials(creds.access_key_id, creds.secret_access_key)
        assert PAM in refused(emu, mint(emu, creds=no_session))
        assert last_event(emu).reason == "missing session token"


@pytest.mark.parametrize(
    ("make_token", "reason"),
    [
        pytest.param(
            lambda e: _tampered(mint(e)),
            "signature mismatch",
            id="tampered-signature",
        ),
        pytest.param(lambda e: mint(e, user="alice"), "wrong user", id="wrong-user"),
        pytest.param(
            lambda e: mint(e, host="other.cluster-x.us-east-1.rds.amazonaws.com"),
            "wrong host",
            id="wrong-host",
        ),
        pytest.param(lambda e: mint(e, port=e.port + 1), "wrong port", id="wrong-port"),
        pytest.param(lambda e: mint(e, region="eu-west-1"), "wrong region", id="wrong-region"),
        pytest.param(
            lambda e: mint(e, creds=Credentials("AKIAUNKNOWNEXAMPLE00", "x")),
            "unknown access key",
            id="unknown-key",
        ),
        pytest.param(
            lambda e: mint(e, creds=Credentials(OTHER.access_key_id, "wrong")),
            "signature mismatch",
            id="wrong-secret",
        ),
        pytest.param(lambda e: "not a token", "malformed token", id="garbage"),
    ],
)
def test_bad_tokens_get_rds_pam_error(emu: Emulator, make_token: object, reason: str) -> None:
    """Every bad token gets RDS's one PAM text; only the event log says why."""
    token = make_token(emu)  # type: ignore[operator]
    text = refused(emu, token)
    assert PAM in text
    event = last_event(emu)
    assert (event.outcome, event.reason) == ("rejected", reason)


@pytest.mark.slow
def test_expired_token_is_refused_after_clock_advance(emu: Emulator) -> None:
    """Advancing the emulated clock past 900 s expires a token minted before."""
    token = mint(emu)
    with connect(emu, token):
        pass
    emu.clock.advance(901)
    assert PAM in refused(emu, token)
    assert last_event(emu).reason == "token expired"


@pytest.mark.slow
def test_expired_credentials_are_refused(backend: Backend) -> None:
    """Tokens signed with temporary keys stop working when the keys expire."""
    clock = EmulatorClock()
    creds = Credentials("ASIAEXPIRINGEXAMPLE0", "secret", "session", expiration=time.time() + 60)
    with Emulator(backend.dsn, credentials=[creds], clock=clock) as emu:
        token = mint(emu)
        with connect(emu, token):
            pass
        clock.advance(61)
        assert PAM in refused(emu, token)
        assert last_event(emu).reason == "credentials expired"


@pytest.mark.slow
def test_open_session_outlives_its_token(emu: Emulator) -> None:
    """An established session keeps working after the token expires, as on RDS."""
    with connect(emu, mint(emu)) as conn:
        emu.clock.advance(3600)
        assert conn.execute("SELECT 2").fetchone() == (2,)


def test_no_tls_is_rejected_like_rds(emu: Emulator) -> None:
    """Without TLS the client gets pg_hba's 'no encryption' refusal."""
    dsn = f"host=127.0.0.1 port={emu.port} user=postgres dbname=app sslmode=disable"
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(dsn, password=mint(emu), connect_timeout=5)
    text = str(info.value)
    assert "pg_hba.conf rejects connection" in text
    assert 'for host "127.0.0.1", user "postgres", database "app", no encryption' in text
    assert last_event(emu).reason == "no encryption"


def test_error_sqlstates_on_the_wire(emu: Emulator) -> None:
    """Refusals carry SQLSTATE 28000 and severity FATAL on the wire."""
    kind, fields = raw_exchange(emu, startup(user="postgres"))
    assert kind == b"E"
    assert (fields["S"], fields["V"], fields["C"]) == ("FATAL", "FATAL", "28000")
    assert fields["M"].endswith("no encryption")


@pytest.mark.skipif(LIBPQ < 170000, reason="sslnegotiation needs libpq 17")
def test_direct_tls_negotiation(emu: Emulator) -> None:
    """libpq's sslnegotiation=direct (TLS first, ALPN postgresql) is served."""
    with connect(emu, mint(emu), sslnegotiation="direct") as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)


@pytest.mark.skipif(LIBPQ < 180000, reason="max_protocol_version needs libpq 18")
def test_protocol_32_request_is_relayed(emu: Emulator) -> None:
    """A protocol 3.2 request reaches the backend; its NegotiateProtocolVersion is relayed."""
    with connect(emu, mint(emu), max_protocol_version="3.2") as conn:
        assert conn.execute("SELECT 3").fetchone() == (3,)
        assert conn.pgconn.protocol_version == 3


def test_startup_parameters_are_relayed(emu: Emulator) -> None:
    """application_name, options and the database reach the backend unchanged."""
    dsn = emu.conninfo("postgres", dbname="template1", password=mint(emu))
    with psycopg.connect(
        dsn, application_name="iampg-test", options="-c statement_timeout=1234"
    ) as conn:
        row = conn.execute(
            "SELECT current_setting('application_name'), current_setting('statement_timeout'),"
            " current_database()"
        ).fetchone()
    assert row == ("iampg-test", "1234ms", "template1")


def test_backend_refusal_is_relayed(emu: Emulator) -> None:
    """A valid token for a database the backend lacks gets the backend's own error."""
    text = refused(emu, mint(emu), dbname="no_such_db_iampg")
    assert 'database "no_such_db_iampg" does not exist' in text
    assert last_event(emu).outcome == "accepted"


@pytest.mark.skipif(
    LIBPQ < 170000,
    reason="before libpq 17 cancel_safe() is the blocking PQcancel, which holds the GIL that "
    "the in-process gateway needs to answer it (test_cancel_from_another_process covers it)",
)
def test_cancel_request_interrupts_a_query(emu: Emulator) -> None:
    """cancel_safe() (a CancelRequest inside TLS with libpq 17+) stops pg_sleep quickly."""
    with connect(emu, mint(emu)) as conn:
        timer = threading.Timer(0.5, conn.cancel_safe)
        timer.start()
        start = time.monotonic()
        try:
            with pytest.raises(pg_errors.QueryCanceled):
                conn.execute("SELECT pg_sleep(10)")
        finally:
            timer.join()
        assert time.monotonic() - start < 5
        conn.rollback()
        assert conn.execute("SELECT 1").fetchone() == (1,)


CANCEL_CHILD = """
import os, threading, time, psycopg
with psycopg.connect(os.environ["IAMPG_TEST_DSN"]) as conn:
    threading.Timer(0.5, getattr(conn, os.environ["IAMPG_TEST_METHOD"])).start()
    start = time.monotonic()
    try:
        conn.execute("SELECT pg_sleep(10)")
    except psycopg.errors.QueryCanceled:
        print("canceled after", time.monotonic() - start)
"""


@pytest.mark.parametrize("method", ["cancel", "cancel_safe"])
def test_cancel_from_another_process(emu: Emulator, method: str) -> None:
    """Plaintext (legacy PQcancel) and TLS cancel requests both reach the backend.

    The client runs in a child process: libpq's blocking PQcancel, as psycopg calls it,
    keeps the GIL while it waits for the server, which would starve the in-process gateway.
    """
    env = {
        **os.environ,
        "IAMPG_TEST_DSN": emu.conninfo("postgres", password=mint(emu)),
        "IAMPG_TEST_METHOD": method,
    }
    result = subprocess.run(
        [sys.executable, "-c", CANCEL_CHILD],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("canceled after")
    assert float(result.stdout.split()[-1]) < 5


def test_many_concurrent_clients(emu: Emulator) -> None:
    """Sessions run side by side, each on its own backend connection."""
    token = mint(emu)

    def work(i: int) -> int:
        with connect(emu, token) as conn:
            row = conn.execute("SELECT pg_backend_pid(), %s::int", (i,)).fetchone()
            assert row is not None
            return int(row[0])

    with ThreadPoolExecutor(8) as pool:
        pids = list(pool.map(work, range(16)))
    assert len(pids) == 16


def test_large_results_stream_through(emu: Emulator) -> None:
    """Megabytes in both directions cross the relay intact."""
    with connect(emu, mint(emu)) as conn:
        payload = "x" * 3_000_000
        assert conn.execute("SELECT length(%s::text)", (payload,)).fetchone() == (3_000_000,)
        rows = conn.execute("SELECT repeat('y', 1000) FROM generate_series(1, 5000)").fetchall()
        assert len(rows) == 5000
        assert all(r == ("y" * 1000,) for r in rows)


def test_tokens_never_reach_events_or_logs(emu: Emulator, caplog: pytest.LogCaptureFixture) -> None:
    """Neither accepted nor refused tokens appear in events or log records."""
    caplog.set_level(logging.DEBUG)
    good = mint(emu)
    bad = mint(emu, user="alice")
    with connect(emu, good):
        pass
    refused(emu, bad)
    signatures = [t.rpartition("=")[2] for t in (good, bad)]
    text = repr(emu.events) + "\n".join(r.getMessage() for r in caplog.records)
    for signature in signatures:
        assert signature not in text
    assert "X-Amz-" not in text


def test_async_start_on_the_callers_loop(backend: Backend) -> None:
    """astart/astop run the gateway on the caller's event loop for async clients."""
    emu = Emulator(backend.dsn)

    async def main() -> None:
        async with emu:
            token = await asyncio.to_thread(mint, emu)
            conn = await psycopg.AsyncConnection.connect(emu.conninfo("postgres", password=token))
            async with conn:
                cur = await conn.execute("SELECT current_user")
                assert await cur.fetchone() == ("postgres",)

    asyncio.run(main())
    assert emu.port == 0


def test_lifecycle_is_idempotent_and_cleans_up(backend: Backend) -> None:
    """start/stop twice is harmless; the CA file goes away on stop; ports are fresh."""
    emu = Emulator(backend.dsn, hostnames=["a.example.com", "b.example.com"], port=0)
    assert "stopped" in repr(emu)
    emu.start()
    emu.start()
    ca_file = emu.ca_file
    assert ca_file.is_file()
    assert emu.port > 0
    assert emu.host == "a.example.com"
    assert emu.hostnames == ("a.example.com", "b.example.com")
    assert emu.listen_host == "127.0.0.1"
    info = dict(item.split("=", 1) for item in emu.conninfo("u", "d", "p w").split(" ", 7)[:7])
    assert info["host"] == "a.example.com"
    assert info["hostaddr"] == "127.0.0.1"
    assert info["sslmode"] == "verify-full"
    assert emu.conninfo("u", "d", "p w").endswith("password='p w'")
    emu.stop()
    emu.stop()
    assert not ca_file.exists()
    with pytest.raises(RuntimeError, match="not running"):
        _ = emu.ca_file


def test_second_hostname_is_signed_and_verified(backend: Backend) -> None:
    """Tokens for any configured host name work, and TLS verifies that name."""
    with Emulator(backend.dsn, hostnames=["a.example.com", "B.Example.com"]) as emu:
        token = mint(emu, host="b.example.com")
        dsn = emu.conninfo("postgres", password=token).replace(
            "host=a.example.com", "host=b.example.com"
        )
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"hostnames": []}, "hostnames"),
        ({"region": ""}, "region"),
        ({"credentials": []}, "credentials"),
        ({"credentials": [FAKE_CREDENTIALS, FAKE_CREDENTIALS]}, "twice"),
        ({"port": 70000}, "port"),
        ({"time_scale": 0}, "time_scale"),
        ({"clock": EmulatorClock(), "time_scale": 2.0}, "either"),
    ],
)
def test_bad_configuration_is_refused_early(kwargs: dict[str, object], match: str) -> None:
    """Configuration mistakes raise iampg.ConfigurationError before anything starts."""
    with pytest.raises(ConfigurationError, match=match):
        Emulator("host=127.0.0.1", **kwargs)  # type: ignore[arg-type]


# --- raw wire-protocol tests ---


def startup(version: int = 196608, **params: str) -> bytes:
    body = struct.pack("!I", version)
    body += b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return struct.pack("!I", len(body) + 4) + body


def raw_exchange(emu: Emulator, data: bytes) -> tuple[bytes, dict[str, str]]:
    """Send bytes in plaintext; return the first reply message's type and error fields."""
    with socket.create_connection(("127.0.0.1", emu.port), timeout=5) as sock:
        sock.sendall(data)
        reply = recv_all(sock)
    return parse_reply(reply)


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def parse_reply(reply: bytes) -> tuple[bytes, dict[str, str]]:
    if not reply:
        return b"", {}
    kind = reply[:1]
    fields: dict[str, str] = {}
    if kind == b"E":
        (length,) = struct.unpack("!I", reply[1:5])
        for item in reply[5 : 1 + length].split(b"\0"):
            if item:
                fields[item[:1].decode()] = item[1:].decode()
    return kind, fields


@pytest.mark.parametrize(
    ("data", "code", "message"),
    [
        pytest.param(struct.pack("!II", 99_999, 196608), "08P01", "invalid length", id="oversized"),
        pytest.param(struct.pack("!II", 4, 196608), "08P01", "invalid length", id="undersized"),
        pytest.param(
            startup(version=0x20000, user="x"),
            "0A000",
            "unsupported frontend protocol",
            id="protocol-2",
        ),
        pytest.param(
            startup(user="x")[:-1] + b"x", "08P01", "invalid startup packet", id="no-terminator"
        ),
        pytest.param(
            struct.pack("!II", 12, 196608) + b"ab\0\0",
            "08P01",
            "invalid startup packet",
            id="odd-parameters",
        ),
        pytest.param(startup(database="x"), "28000", "no PostgreSQL user name", id="no-user"),
        pytest.param(
            struct.pack("!II", 8, 80877103) + b"plaintext",
            "08P01",
            "received unencrypted data after SSL request",
            id="bytes-after-sslrequest",
        ),
        pytest.param(
            struct.pack("!II", 12, 80877102) + b"1234",
            "08P01",
            "invalid length of cancel request",
            id="short-cancel",
        ),
    ],
)
def test_bad_startup_gets_protocol_error_and_server_survives(
    emu: Emulator, data: bytes, code: str, message: str
) -> None:
    """Malformed startup packets get an ErrorResponse and close; the next client is served."""
    kind, fields = raw_exchange(emu, data)
    assert kind == b"E"
    assert fields["C"] == code
    assert message in fields["M"]
    with connect(emu, mint(emu)) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="immediate-close"),
        pytest.param(b"\x00\x00", id="truncated-length"),
        pytest.param(struct.pack("!II", 100, 196608) + b"user", id="truncated-body"),
        pytest.param(b"\x16\x03\x01\x00\x05hello", id="bad-tls-hello"),
    ],
)
def test_clients_vanishing_mid_startup_are_harmless(emu: Emulator, data: bytes) -> None:
    """Half-sent packets and broken TLS hellos end quietly; others are still served."""
    with socket.create_connection(("127.0.0.1", emu.port), timeout=5) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        recv_all(sock)
    with connect(emu, mint(emu)) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


@settings(max_examples=examples(300), deadline=None)
@given(st.binary(max_size=200))
def test_startup_parser_never_crashes(data: bytes) -> None:
    """Any startup packet body parses to parameters or raises the protocol-violation error."""
    packet = struct.pack("!II", len(data) + 8, 196608) + data
    try:
        params = _startup_parameters(packet)
    except _ProtocolViolationError as exc:
        sqlstate = exc.sqlstate
    else:
        sqlstate = "valid"
        assert all(isinstance(k, str) and k for k in params)
    assert sqlstate in {"08P01", "valid"}


def test_gssenc_is_declined_then_ssl_accepted(emu: Emulator) -> None:
    """GSSENCRequest gets 'N', a following SSLRequest gets 'S' and a TLS handshake."""
    context = ssl.create_default_context(cafile=str(emu.ca_file))
    with socket.create_connection(("127.0.0.1", emu.port), timeout=5) as sock:
        sock.sendall(struct.pack("!II", 8, 80877104))
        assert sock.recv(1) == b"N"
        sock.sendall(struct.pack("!II", 8, 80877103))
        assert sock.recv(1) == b"S"
        with context.wrap_socket(sock, server_hostname=emu.host) as tls:
            tls.sendall(startup(user="postgres"))
            assert tls.recv(9) == b"R\x00\x00\x00\x08\x00\x00\x00\x03"
            tls.sendall(b"p\x00\x00\x00\x0ashort\x00")
            kind, fields = parse_reply(recv_all(tls))
    assert kind == b"E"
    assert fields["C"] == "28000"
    assert fields["M"] == PAM


def test_slow_client_does_not_block_others(emu: Emulator) -> None:
    """A client stuck mid-startup holds nothing up for the next one."""
    with socket.create_connection(("127.0.0.1", emu.port), timeout=5) as stuck:
        stuck.sendall(struct.pack("!I", 100))
        with connect(emu, mint(emu)) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)


def test_stop_closes_open_sessions(backend: Backend) -> None:
    """stop() ends relayed sessions: their next query fails instead of hanging."""
    emu = Emulator(backend.dsn)
    emu.start()
    try:
        conn = connect(emu, mint(emu))
    finally:
        emu.stop()
    with conn, pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")


def _tls_client(emu: Emulator) -> ssl.SSLSocket:
    """Return a socket that asked for TLS and finished the handshake, nothing more."""
    raw = socket.create_connection(("127.0.0.1", emu.port), timeout=5)
    raw.sendall(struct.pack("!II", 8, 80877103))  # SSLRequest
    assert raw.recv(1) == b"S"
    context = ssl.create_default_context(cafile=str(emu.ca_file))
    return context.wrap_socket(raw, server_hostname=emu.host)


def test_stop_leaves_no_socket_open(backend: Backend) -> None:
    """stop() closes every connection whatever its state, instead of leaving it to the GC."""
    emu = Emulator(backend.dsn)
    emu.start()
    port = emu.port
    clients: list[socket.socket] = []
    relaying = None
    try:
        clients.append(socket.create_connection(("127.0.0.1", port), timeout=5))  # silent
        mid_tls = socket.create_connection(("127.0.0.1", port), timeout=5)
        clients.append(mid_tls)
        mid_tls.sendall(struct.pack("!II", 8, 80877103))  # then no ClientHello
        assert mid_tls.recv(1) == b"S"
        clients.append(_tls_client(emu))  # no StartupMessage
        asked = _tls_client(emu)
        clients.append(asked)
        body = b"user\x00postgres\x00\x00"
        asked.sendall(struct.pack("!II", 8 + len(body), 196608) + body)
        assert asked.recv(1) == b"R"  # asked for the password, which never comes
        relaying = connect(emu, mint(emu))
        assert emu.connection_count == 2
    finally:
        emu.stop()
        leftover = open_sockets(port, side="local")
        if relaying is not None:
            relaying.close()
        for client in clients:
            client.close()
    assert not leftover, f"sockets stop() left open: {leftover}"


@pytest.mark.slow
def test_stop_under_connection_churn_is_clean(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    """Stopped while 12 threads connect and disconnect, eight times over: no session fails
    with an error of the gateway's own, no socket stays open, no backend session is left."""
    caplog.set_level(logging.WARNING, logger="iampg.emulator")
    app = "iampg-churn-test"
    live = 0  # the churn's sessions, seen on the backend at least once: the check can fail
    for _ in range(8):
        emu = Emulator(backend.dsn)
        emu.start()
        port = emu.port
        ep = endpoint_for(emu, application_name=app, connect_timeout="2")
        provider = TokenProvider(ep)
        stop = threading.Event()
        threads = [threading.Thread(target=_churn, args=(provider, stop)) for _ in range(12)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        live = max(live, len(sessions_of(backend, app)))
        emu.stop()
        leftover = open_sockets(port, side="local")
        stop.set()
        for t in threads:
            t.join(timeout=30)
        assert not leftover, f"sockets stop() left open: {leftover}"
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert live > 0
    assert sessions_left(backend, app, within=5.0) == []


def _churn(provider: TokenProvider, stop: threading.Event) -> None:
    """Connect, query and disconnect until told to stop."""
    while not stop.is_set():
        if not _connect_once(provider):
            time.sleep(0.01)


def _connect_once(provider: TokenProvider) -> bool:
    """Connect and query once; False if refused or cut (by the stop: expected here)."""
    try:
        with iampg.connect(provider=provider, wait=0) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError:
        return False
    return True


def test_stop_as_a_connection_arrives_leaves_no_socket_open(backend: Backend) -> None:
    """A connection that arrives in the loop turn that stops the gateway is not left open.

    asyncio's own sock_accept(), cancelled in that turn, accepts the connection anyway and
    drops it open ("InvalidStateError"); its client then waits for an answer that never comes.
    """

    async def main() -> tuple[list[socket.socket], bytes | None]:
        emu = Emulator(backend.dsn)
        await emu.astart()
        port = emu.port
        await asyncio.sleep(0.05)  # the gateway now waits for a connection
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        # The stop's first step and the listener's readiness land in the same loop turn.
        stopping = asyncio.create_task(emu.astop())
        await asyncio.sleep(0)
        await stopping
        leftover = open_sockets(port, side="local")
        try:
            answer: bytes | None = client.recv(1)  # b"" (closed) once nothing holds it
        except ConnectionResetError:
            answer = None  # reset from the backlog: as good
        finally:
            client.close()
        return leftover, answer

    leftover, answer = asyncio.run(main())
    assert not leftover, f"sockets stop() left open: {leftover}"
    assert answer in (b"", None)
