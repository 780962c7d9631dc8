"""Protocol edges the gateway tests leave open: direct TLS without ALPN, bad messages in TLS."""

from __future__ import annotations

import socket
import ssl
import struct

import pytest

import iampg
from iampg.emulator import Emulator
from support import endpoint_for


@pytest.fixture
def emu(emulator: Emulator) -> Emulator:
    """Return a running RDS-mode emulator on real time."""
    return emulator


def startup(**params: str) -> bytes:
    body = struct.pack("!I", 196608)
    body += b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return struct.pack("!I", len(body) + 4) + body


def read_all(sock: socket.socket | ssl.SSLSocket) -> bytes:
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except (ssl.SSLError, ConnectionResetError):
        pass  # the server closed after its error; what arrived before counts
    return b"".join(chunks)


def error_fields(data: bytes) -> dict[str, str]:
    """Return the fields of the first ErrorResponse in ``data`` (skipping other messages)."""
    while data:
        kind, (length,) = data[:1], struct.unpack("!I", data[1:5])
        if kind == b"E":
            items = data[5 : 1 + length].split(b"\0")
            return {item[:1].decode(): item[1:].decode() for item in items if item}
        data = data[1 + length :]
    return {}


def tls_context(emu: Emulator, alpn: list[str] | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(emu.ca_file))
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    return context


def still_serves(emu: Emulator) -> bool:
    with iampg.connect(endpoint_for(emu)) as conn:
        return conn.execute("select 1").fetchone() == (1,)


def test_direct_tls_without_alpn_is_refused(emu: Emulator) -> None:
    """TLS from the first byte without ALPN 'postgresql' gets PostgreSQL's 08P01 refusal."""
    with (
        socket.create_connection(("127.0.0.1", emu.port), timeout=5) as raw,
        tls_context(emu, None).wrap_socket(raw, server_hostname=emu.host) as tls,
    ):
        fields = error_fields(read_all(tls))
    assert fields["C"] == "08P01"
    assert fields["M"] == (
        "received direct SSL connection request without ALPN protocol negotiation extension"
    )
    assert still_serves(emu)


def test_direct_tls_with_alpn_reaches_authentication(emu: Emulator) -> None:
    """Direct TLS with ALPN 'postgresql' is answered with the cleartext-password request."""
    with (
        socket.create_connection(("127.0.0.1", emu.port), timeout=5) as raw,
        tls_context(emu, ["postgresql"]).wrap_socket(raw, server_hostname=emu.host) as tls,
    ):
        assert tls.selected_alpn_protocol() == "postgresql"
        tls.sendall(startup(user="postgres"))
        assert tls.recv(9) == b"R\x00\x00\x00\x08\x00\x00\x00\x03"


def tls_session(emu: Emulator) -> tuple[socket.socket, ssl.SSLSocket]:
    raw = socket.create_connection(("127.0.0.1", emu.port), timeout=5)
    raw.sendall(struct.pack("!II", 8, 80877103))
    assert raw.recv(1) == b"S"
    return raw, tls_context(emu, None).wrap_socket(raw, server_hostname=emu.host)


@pytest.mark.parametrize(
    ("after_startup", "message"),
    [
        pytest.param(
            b"Q\x00\x00\x00\x0dselect 1\x00",
            "expected password response, got message type 81",
            id="query-instead-of-password",
        ),
        pytest.param(
            b"p" + struct.pack("!I", 1 << 30), "invalid message length", id="oversized-password"
        ),
        pytest.param(b"p" + struct.pack("!I", 2), "invalid message length", id="short-length"),
        pytest.param(
            b"p\x00\x00\x00\x08ab\x00\x00",
            "invalid password packet size",
            id="nul-inside-password",
        ),
        pytest.param(
            b"p\x00\x00\x00\x07abc", "invalid password packet size", id="unterminated-password"
        ),
    ],
)
def test_malformed_password_messages_get_protocol_errors(
    emu: Emulator, after_startup: bytes, message: str
) -> None:
    """A broken password message inside TLS gets 08P01 and a close; the gateway survives."""
    raw, tls = tls_session(emu)
    with raw, tls:
        tls.sendall(startup(user="postgres"))
        assert tls.recv(9) == b"R\x00\x00\x00\x08\x00\x00\x00\x03"
        tls.sendall(after_startup)
        fields = error_fields(read_all(tls))
    assert (fields["C"], fields["M"]) == ("08P01", message)
    assert still_serves(emu)


def test_ssl_request_inside_tls_is_a_protocol_error(emu: Emulator) -> None:
    """A second SSLRequest inside the TLS session is refused with 08P01."""
    raw, tls = tls_session(emu)
    with raw, tls:
        tls.sendall(struct.pack("!II", 8, 80877103))
        fields = error_fields(read_all(tls))
    assert fields["C"] == "08P01"
    assert "encryption requested" in fields["M"]
    assert still_serves(emu)
