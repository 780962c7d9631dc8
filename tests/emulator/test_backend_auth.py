"""Tests of how the gateway logs in to its backend: trust, cleartext, MD5 and SCRAM-SHA-256."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import socket
import struct
import threading
from typing import TYPE_CHECKING

import botocore.session
import psycopg
import pytest

from iampg.emulator import Emulator
from iampg.emulator._gateway import _ScramClient

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

PASSWORD = "backend-sekret"


# Keep botocore's DEBUG lines (which show signatures) out of failure reports.
pytestmark = pytest.mark.usefixtures("quiet_botocore")


def mint(emu: Emulator, user: str = "app") -> str:
    session = botocore.session.get_session()
    creds = emu.credentials
    session.set_credentials(creds.access_key_id, creds.secret_access_key)
    client = session.create_client("rds", region_name=emu.region)
    token: str = client.generate_db_auth_token(emu.host, emu.port, user, emu.region)
    return token


def message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def recv_message(sock: socket.socket) -> tuple[bytes, bytes]:
    header = recv_exactly(sock, 5)
    (length,) = struct.unpack("!I", header[1:])
    return header[:1], recv_exactly(sock, length - 4)


def auth(code: int, data: bytes = b"") -> bytes:
    return message(b"R", struct.pack("!I", code) + data)


def scram_server(sock: socket.socket) -> bool:
    """Run the server half of SCRAM-SHA-256 for PASSWORD; return whether the proof held."""
    sock.sendall(auth(10, b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0"))
    _, body = recv_message(sock)
    mechanism, _, rest = body.partition(b"\0")
    assert mechanism == b"SCRAM-SHA-256"
    client_first = rest[4:].decode()
    assert client_first.startswith("n,,")
    first_bare = client_first[3:]
    nonce = dict(i.split("=", 1) for i in first_bare.split(","))["r"] + "srvnonce"
    salt, iterations = b"0123456789abcdef", 4096
    server_first = f"r={nonce},s={base64.b64encode(salt).decode()},i={iterations}"
    sock.sendall(auth(11, server_first.encode()))
    _, final = recv_message(sock)
    final_text = final.decode()
    without_proof, _, proof_text = final_text.rpartition(",p=")
    salted = hashlib.pbkdf2_hmac("sha256", PASSWORD.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    auth_message = f"{first_bare},{server_first},{without_proof}".encode()
    signature = hmac.new(stored_key, auth_message, hashlib.sha256).digest()
    proof = base64.b64decode(proof_text)
    recovered = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
    if hashlib.sha256(recovered).digest() != stored_key:
        return False
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    verifier = hmac.new(server_key, auth_message, hashlib.sha256).digest()
    sock.sendall(auth(12, b"v=" + base64.b64encode(verifier)))
    return True


def password_server(code: int) -> Callable[[socket.socket], bool]:
    def run(sock: socket.socket) -> bool:
        salt = b"\x01\x02\x03\x04"
        sock.sendall(auth(code, salt if code == 5 else b""))
        kind, body = recv_message(sock)
        assert kind == b"p"
        if code == 3:
            return body == PASSWORD.encode() + b"\0"
        inner = hashlib.md5((PASSWORD + "app").encode()).hexdigest()
        expected = "md5" + hashlib.md5(inner.encode() + salt).hexdigest()
        return body == expected.encode() + b"\0"

    return run


class FakeBackend:
    """A one-connection-at-a-time PostgreSQL imitation that runs one login method."""

    def __init__(self, login: Callable[[socket.socket], bool] | None) -> None:
        self.login = login
        self.results: list[bool] = []
        self.startup: dict[str, str] = {}
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with sock, contextlib.suppress(ConnectionError, OSError):
                self.handle(sock)

    def handle(self, sock: socket.socket) -> None:
        (length,) = struct.unpack("!I", recv_exactly(sock, 4))
        body = recv_exactly(sock, length - 4)
        items = body[4:-2].split(b"\0")
        self.startup = {
            k.decode(): v.decode() for k, v in zip(items[::2], items[1::2], strict=True)
        }
        ok = self.login(sock) if self.login is not None else True
        self.results.append(ok)
        if not ok:
            fields = b"SFATAL\0C28P01\0Mpassword authentication failed\0\0"
            sock.sendall(message(b"E", fields))
            return
        sock.sendall(auth(0))
        for key, value in (
            ("server_version", "15.0"),
            ("client_encoding", "UTF8"),
            ("standard_conforming_strings", "on"),
            ("integer_datetimes", "on"),
        ):
            sock.sendall(message(b"S", key.encode() + b"\0" + value.encode() + b"\0"))
        sock.sendall(message(b"K", struct.pack("!II", 4242, 99)))
        sock.sendall(message(b"Z", b"I"))
        while True:
            kind, _ = recv_message(sock)
            if kind == b"X":
                return

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(5)


@pytest.fixture
def fake_backend(request: pytest.FixtureRequest) -> Iterator[FakeBackend]:
    backend = FakeBackend(request.param)
    yield backend
    backend.close()


@pytest.mark.parametrize(
    "fake_backend",
    [
        pytest.param(None, id="trust"),
        pytest.param(password_server(3), id="cleartext"),
        pytest.param(password_server(5), id="md5"),
        pytest.param(scram_server, id="scram-sha-256"),
    ],
    indirect=True,
)
def test_gateway_logs_in_with_the_backend_password(fake_backend: FakeBackend) -> None:
    """Each backend login method gets the backend DSN's password right."""
    dsn = f"host=127.0.0.1 port={fake_backend.port} user=postgres password={PASSWORD}"
    with Emulator(dsn, require_rds_iam=False) as emu:
        conninfo = emu.conninfo("app", dbname="appdb", password=mint(emu))
        with psycopg.connect(conninfo, application_name="fake", connect_timeout=5) as conn:
            assert conn.info.backend_pid == 4242
            assert conn.info.parameter_status("server_version") == "15.0"
    assert fake_backend.results == [True]
    assert fake_backend.startup["user"] == "app"
    assert fake_backend.startup["database"] == "appdb"
    assert fake_backend.startup["application_name"] == "fake"


@pytest.mark.parametrize("fake_backend", [password_server(3)], indirect=True)
def test_backend_password_required_but_missing(fake_backend: FakeBackend) -> None:
    """A backend that wants a password the DSN lacks gets a clear refusal, not a hang."""
    with Emulator(f"host=127.0.0.1 port={fake_backend.port}", require_rds_iam=False) as emu:
        conninfo = emu.conninfo("app", password=mint(emu))
        with pytest.raises(psycopg.OperationalError, match="backend connection string has none"):
            psycopg.connect(conninfo, connect_timeout=5)


@pytest.mark.parametrize("fake_backend", [password_server(3)], indirect=True)
def test_backend_rejection_is_relayed(fake_backend: FakeBackend) -> None:
    """The backend's own ErrorResponse reaches the client unchanged."""
    dsn = f"host=127.0.0.1 port={fake_backend.port} password=wrong"
    with Emulator(dsn, require_rds_iam=False) as emu:
        conninfo = emu.conninfo("app", password=mint(emu))
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(conninfo, connect_timeout=5)


@pytest.mark.parametrize("require_rds_iam", [False, True])
def test_unreachable_backend_is_reported(*, require_rds_iam: bool) -> None:
    """With no server behind it, the gateway says so after checking the token.

    Without the rds_iam rule the token is accepted first; with it, asking the backend
    about rds_iam is what fails, with the same error.
    """
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
        dsn = f"host=127.0.0.1 port={port} connect_timeout=2"
        with Emulator(dsn, require_rds_iam=require_rds_iam) as emu:
            conninfo = emu.conninfo("app", password=mint(emu))
            with pytest.raises(psycopg.OperationalError, match="cannot reach the backend"):
                psycopg.connect(conninfo, connect_timeout=5)
            if not require_rds_iam:
                assert emu.events[-1].outcome == "accepted"


def test_scram_client_matches_rfc_7677() -> None:
    """The SCRAM client reproduces RFC 7677's worked example."""
    client = _ScramClient("pencil", user="user", nonce="rOprNGfwEbeRWgbNEkqO")
    assert client.first_message() == b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    final = client.final_message(
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    )
    assert final == (
        b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
        b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    )
    client.verify_final(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
    with pytest.raises(ValueError, match="signature"):
        client.verify_final(b"v=AAAA")
    with pytest.raises(ValueError, match="nonce"):
        _ScramClient("pencil", nonce="abc").final_message(b"r=xyz,s=AAAA,i=1")
