"""Tests of the emulator's DSQL mode: tokens, texts, SNI, limits and the 1-hour cap."""

from __future__ import annotations

import re
import socket
import ssl
import struct
import time
from typing import TYPE_CHECKING, Any

import botocore.session
import psycopg
import pytest

from iampg import Endpoint
from iampg.emulator import FAKE_CREDENTIALS, DsqlRules, Emulator, Event
from iampg.emulator._sigv4 import presign
from support import EmulatorFactory

if TYPE_CHECKING:
    from collections.abc import Callable

    from iampg.emulator import Backend

DENIED = "FATAL:  unable to accept connection, access denied"
NO_SNI = "FATAL:  unable to accept connection, sni was not received"
TOO_MANY = "FATAL:  unable to accept connection, too many open connections."
RATE = "FATAL:  unable to accept connection, rate exceeded."
WAKING = "FATAL:  unable to accept connection, waking up cluster, please retry later"
ROLE = "iampg_dsql_role"
WAIT = 10.0  # real seconds any background decision may take to show


# Keep botocore's DEBUG lines (which show signatures) out of failure reports.
pytestmark = pytest.mark.usefixtures("quiet_botocore")


@pytest.fixture(scope="module")
def roles(backend: Backend) -> None:
    """Create DSQL's admin role and an ordinary role on the backend."""
    backend.ensure_role("admin", superuser=True)  # as the plugin makes it
    backend.ensure_role(ROLE)


@pytest.fixture
def dsql(start_emulator: EmulatorFactory, roles: None) -> Emulator:
    """Return a running DSQL emulator (the dsql profile) on real time."""
    return start_emulator(service="dsql")


@pytest.fixture
def dsql_cap(start_emulator: EmulatorFactory, roles: None) -> Emulator:
    """Return a DSQL emulator whose SQL rules are off, for a session-cap test that uses a
    temporary table, which DSQL's SQL rules refuse on their own."""
    return start_emulator(service="dsql", dsql_rules=DsqlRules.off())


def mint(emu: Emulator, *, admin: bool = True, expires: int = 900, host: str | None = None) -> str:
    """Return a DSQL token botocore signs for the emulator."""
    session = botocore.session.get_session()
    creds = emu.credentials
    session.set_credentials(creds.access_key_id, creds.secret_access_key, creds.session_token)
    client = session.create_client("dsql", region_name=emu.region)
    generate = (
        client.generate_db_connect_admin_auth_token
        if admin
        else client.generate_db_connect_auth_token
    )
    token: str = generate(host or emu.host, emu.region, expires)
    return token


def connect(
    emu: Emulator, token: str, user: str = "admin", **kwargs: Any
) -> psycopg.Connection[Any]:
    return psycopg.connect(emu.conninfo(user, password=token), connect_timeout=5, **kwargs)


def refused(connect_once: Callable[[], psycopg.Connection[Any]]) -> str:
    with pytest.raises(psycopg.OperationalError) as info:
        connect_once().close()
    assert info.value.sqlstate is None  # libpq gives connect failures no SQLSTATE
    return str(info.value)


def last(emu: Emulator) -> Event:
    assert emu.events, "no event was recorded"
    return emu.events[-1]


def state(emu: Emulator) -> str:
    """Read the state afresh (other threads change it; keeps mypy from narrowing)."""
    return emu.state


def wait_for_event(emu: Emulator, outcome: str, reason: str) -> Event:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        for event in emu.events:
            if (event.outcome, event.reason) == (outcome, reason):
                return event
        time.sleep(0.01)
    pytest.fail(f"no {outcome}/{reason} event: {emu.events}")


def raw_attempt(emu: Emulator, user: str, password: str, *, sni: str | None) -> dict[str, str]:
    """Speak the protocol by hand over TLS; return the ErrorResponse's fields by code."""
    context = ssl.create_default_context(cafile=str(emu.ca_file))
    context.check_hostname = sni is not None
    with socket.create_connection((emu.listen_host, emu.port), timeout=5) as sock:
        sock.sendall(struct.pack("!II", 8, 80877103))
        assert sock.recv(1) == b"S"
        with context.wrap_socket(sock, server_hostname=sni) as tls:
            params = b"user\0" + user.encode() + b"\0database\0postgres\0\0"
            tls.sendall(struct.pack("!II", 8 + len(params), 196608) + params)
            kind, body = read_message(tls)
            if kind == b"R":
                assert struct.unpack("!I", body[:4]) == (3,)  # cleartext password
                tls.sendall(b"p" + struct.pack("!I", len(password) + 5) + password.encode() + b"\0")
                kind, body = read_message(tls)
            assert kind == b"E"
    return {chr(f[0]): f[1:].decode() for f in body.split(b"\0") if f}


def read_message(tls: ssl.SSLSocket) -> tuple[bytes, bytes]:
    header = recv_exactly(tls, 5)
    (length,) = struct.unpack("!I", header[1:])
    return header[:1], recv_exactly(tls, length - 4)


def recv_exactly(tls: ssl.SSLSocket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = tls.recv(n - len(data))
        assert chunk, "the emulator closed the connection early"
        data += chunk
    return data


def test_admin_token_connects_to_dsql_shaped_host(dsql: Emulator) -> None:
    """botocore's admin token logs in as admin; the host name looks like a DSQL cluster's."""
    assert re.fullmatch(r"[a-z0-9]{26}\.dsql\.us-east-1\.on\.aws", dsql.host)
    endpoint = Endpoint(dsql.host)
    assert (endpoint.kind, endpoint.region) == ("dsql", "us-east-1")
    with connect(dsql, mint(dsql)) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("admin",)
        assert dsql.session_count == 1
    assert (last(dsql).outcome, last(dsql).user) == ("accepted", "admin")


def test_role_token_connects_as_role(dsql: Emulator) -> None:
    """A DbConnect token logs in as an ordinary role the admin mapped to the caller."""
    with connect(dsql, mint(dsql)) as admin:
        admin.execute(f"AWS IAM GRANT {ROLE} TO '{dsql.principal}'")
    with connect(dsql, mint(dsql, admin=False), ROLE) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (ROLE,)


@pytest.mark.parametrize(
    ("user", "admin", "action"),
    [("admin", False, "DbConnect"), (ROLE, True, "DbConnectAdmin")],
    ids=["admin-with-DbConnect", "role-with-DbConnectAdmin"],
)
def test_wrong_action_gets_access_denied_with_hint(
    dsql: Emulator, user: str, admin: bool, action: str
) -> None:
    """admin needs DbConnectAdmin, any other role DbConnect; the HINT names the mismatch."""
    text = refused(lambda: connect(dsql, mint(dsql, admin=admin), user))
    hint = f"Wrong user to action mapping. user: {user}, action: {action}"
    assert f"{DENIED}\nHINT:  {hint}" in text
    event = last(dsql)
    assert (event.outcome, event.reason, event.sqlstate, event.hint) == (
        "rejected",
        "wrong action",
        "08006",
        hint,
    )


def test_expired_token_hint_says_signature_expired(dsql: Emulator) -> None:
    """A token past its ExpiresIn is refused with a 'Signature expired:' HINT."""
    token = mint(dsql, expires=60)
    with connect(dsql, token):
        pass
    dsql.clock.advance(61)
    text = refused(lambda: connect(dsql, token))
    assert DENIED in text
    assert "\nHINT:  Signature expired: " in text
    event = last(dsql)
    assert (event.reason, event.sqlstate) == ("token expired", "08006")
    assert re.fullmatch(
        r"Signature expired: \d{8}T\d{6}Z is now earlier than \d{8}T\d{6}Z "
        r"\(\d{8}T\d{6}Z - 1 min\.\)",
        event.hint,
    )


@pytest.mark.parametrize(
    ("make_token", "reason"),
    [
        pytest.param(lambda e: mint(e, expires=604_801), "invalid expiry", id="expires-too-long"),
        pytest.param(
            lambda e: mint(e, host="abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws"),
            "wrong host",
            id="wrong-host",
        ),
        pytest.param(
            lambda e: presign(
                host=e.host,
                port=e.port,
                credentials=FAKE_CREDENTIALS,
                region=e.region,
                signed_at=time.time(),
                user="admin",
            ),
            "wrong service",
            id="rds-token",
        ),
        pytest.param(lambda e: mint(e)[:-1] + "x", "signature mismatch", id="tampered"),
    ],
)
def test_bad_tokens_get_access_denied(
    dsql: Emulator, make_token: Callable[[Emulator], str], reason: str
) -> None:
    """Every bad token gets 08006 access denied with a HINT; the event log says why."""
    text = refused(lambda: connect(dsql, make_token(dsql)))
    assert DENIED in text
    assert "\nHINT:  " in text
    event = last(dsql)
    assert (event.outcome, event.reason, event.sqlstate) == ("rejected", reason, "08006")


def test_longest_expiry_is_accepted(dsql: Emulator) -> None:
    """ExpiresIn 604800 (a week, the documented maximum) is accepted."""
    with connect(dsql, mint(dsql, expires=604_800)) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_raw_error_response_carries_code_message_and_hint(dsql: Emulator) -> None:
    """On the wire the refusal is FATAL, 08006, the message and an H (hint) field."""
    fields = raw_attempt(dsql, "admin", mint(dsql, admin=False), sni=dsql.host)
    assert fields == {
        "S": "FATAL",
        "V": "FATAL",
        "C": "08006",
        "M": "unable to accept connection, access denied",
        "H": "Wrong user to action mapping. user: admin, action: DbConnect",
    }


def test_ip_literal_host_gets_sni_not_received(dsql: Emulator) -> None:
    """libpq sends no SNI for an IP literal: the connection is refused before any password."""
    dsn = f"host=127.0.0.1 port={dsql.port} user=admin dbname=postgres sslmode=require"
    text = refused(lambda: psycopg.connect(dsn, password=mint(dsql), connect_timeout=5))
    assert NO_SNI in text
    event = last(dsql)
    assert (event.outcome, event.reason, event.sqlstate) == ("rejected", "no sni", "08006")


def test_raw_no_sni_error_fields(dsql: Emulator) -> None:
    """Without a server name the ErrorResponse is FATAL 08006 'sni was not received'."""
    fields = raw_attempt(dsql, "admin", "unused", sni=None)
    assert (fields["S"], fields["C"], fields["M"]) == (
        "FATAL",
        "08006",
        "unable to accept connection, sni was not received",
    )
    assert "H" not in fields


def test_plaintext_gets_sni_not_received(dsql: Emulator) -> None:
    """Without TLS there is no SNI either: the same refusal, logged as no encryption."""
    dsn = f"host=127.0.0.1 port={dsql.port} user=admin dbname=postgres sslmode=disable"
    text = refused(lambda: psycopg.connect(dsn, password="x", connect_timeout=5))
    assert NO_SNI in text
    assert (last(dsql).reason, last(dsql).sqlstate) == ("no encryption", "08006")


def test_sni_can_be_turned_off(backend: Backend, roles: None) -> None:
    """require_sni=False accepts an IP-literal connection (certificate not verified)."""
    with Emulator(backend.dsn, service="dsql", require_sni=False) as emu:
        dsn = f"host=127.0.0.1 port={emu.port} user=admin dbname=postgres sslmode=require"
        with psycopg.connect(dsn, password=mint(emu), connect_timeout=5) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)


def test_connection_count_limit(backend: Backend, roles: None) -> None:
    """Past max_connections open connections, DSQL's 53300 text; a closed one frees a slot."""
    with Emulator(backend.dsn, service="dsql", max_connections=2) as emu:
        first = connect(emu, mint(emu))
        second = connect(emu, mint(emu))
        try:
            assert emu.connection_count == 2
            assert TOO_MANY in refused(lambda: connect(emu, mint(emu)))
            event = last(emu)
            assert (event.reason, event.sqlstate) == ("too many connections", "53300")
        finally:
            first.close()
        deadline = time.monotonic() + WAIT
        while emu.connection_count > 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        with connect(emu, mint(emu)) as third:
            assert third.execute("SELECT 3").fetchone() == (3,)
        second.close()


def test_raw_too_many_connections_fields(backend: Backend, roles: None) -> None:
    """On the wire the count refusal is FATAL 53300 with DSQL's message, before any password."""
    with Emulator(backend.dsn, service="dsql", max_connections=1) as emu, connect(emu, mint(emu)):
        fields = raw_attempt(emu, "admin", "unused", sni=emu.host)
    assert (fields["S"], fields["C"], fields["M"]) == (
        "FATAL",
        "53300",
        "unable to accept connection, too many open connections.",
    )


def test_connection_rate_limit(backend: Backend, roles: None) -> None:
    """Past the burst, DSQL's 53400 'rate exceeded.'; the bucket refills on the emulated clock."""
    with Emulator(backend.dsn, service="dsql", connection_rate=1.0, connection_burst=2) as emu:
        token = mint(emu)
        for _ in range(2):
            connect(emu, token).close()
        assert RATE in refused(lambda: connect(emu, token))
        event = last(emu)
        assert (event.outcome, event.reason, event.sqlstate) == (
            "rejected",
            "rate exceeded",
            "53400",
        )
        emu.clock.advance(1.5)
        connect(emu, mint(emu)).close()
        assert last(emu).outcome == "accepted"


@pytest.mark.slow
def test_paused_cluster_answers_waking_up_then_resumes(backend: Backend, roles: None) -> None:
    """A paused DSQL cluster refuses with 'waking up' and starts resuming; later it accepts."""
    with Emulator(backend.dsn, service="dsql", resume_delay=30.0) as emu:
        emu.pause()
        assert state(emu) == "paused"
        token = mint(emu)
        assert WAKING in refused(lambda: connect(emu, token))
        event = last(emu)
        assert (event.outcome, event.reason, event.sqlstate) == ("rejected", "waking up", "57P03")
        assert state(emu) == "resuming"
        assert WAKING in refused(lambda: connect(emu, token))
        emu.clock.advance(30)
        wait_for_event(emu, "resumed", "resume delay")
        assert state(emu) == "running"
        with connect(emu, mint(emu)) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        cluster = [(e.outcome, e.reason) for e in emu.events if not e.peer]
        assert cluster == [
            ("paused", "requested"),
            ("resuming", "connection"),
            ("resumed", "resume delay"),
        ]


def test_session_cap_closes_idle_session(dsql: Emulator) -> None:
    """At one hour an idle session is closed abruptly; the next query fails."""
    conn = connect(dsql, mint(dsql), autocommit=True)
    with conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        dsql.clock.advance(3600)
        event = wait_for_event(dsql, "closed", "session cap")
        assert event.user == "admin"
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 2")
    assert dsql.session_count == 0


@pytest.mark.slow
def test_session_cap_lets_open_transaction_finish(dsql_cap: Emulator) -> None:
    """A transaction open at the cap may go on and commit; then the session is closed."""
    conn = connect(dsql_cap, mint(dsql_cap))
    with conn:
        dsql_cap.clock.advance(3500)
        conn.execute("CREATE TEMP TABLE t (x int)")
        conn.execute("INSERT INTO t VALUES (1)")  # psycopg opened a transaction
        dsql_cap.clock.advance(100)
        time.sleep(0.2)  # ten monitor ticks: the session is capped, not closed
        assert not [e for e in dsql_cap.events if e.outcome == "closed"]
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (1,)
        conn.commit()
        wait_for_event(dsql_cap, "closed", "session cap")
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")


@pytest.mark.slow
def test_session_cap_transaction_limit(dsql: Emulator) -> None:
    """A transaction still open five minutes after it began, past the cap, is cut."""
    conn = connect(dsql, mint(dsql))
    with conn:
        dsql.clock.advance(3500)
        conn.execute("SELECT 1")  # opens a transaction
        dsql.clock.advance(100)
        time.sleep(0.1)
        assert not [e for e in dsql.events if e.outcome == "closed"]
        dsql.clock.advance(200)
        wait_for_event(dsql, "closed", "transaction limit")
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
