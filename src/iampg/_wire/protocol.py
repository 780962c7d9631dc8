"""Messages of the PostgreSQL wire protocol: constants, framing, startup packets, errors."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from .streams import Channel

SSL_REQUEST: Final = 80877103
GSSENC_REQUEST: Final = 80877104
CANCEL_REQUEST: Final = 80877102
TLS_HANDSHAKE_BYTE: Final = 0x16
MAX_STARTUP_PACKET: Final = 10_000
MIN_CANCEL_PACKET: Final = 16
MAX_CANCEL_PACKET: Final = 8 + 256  # protocol 3.2 allows cancel keys up to 256 bytes
MAX_AUTH_MESSAGE: Final = 65_535 + 4
MAX_BACKEND_AUTH_MESSAGE: Final = 1 << 20
MAX_NEGOTIATIONS: Final = 2
READ_LIMIT: Final = 1 << 16
CLOSE_TIMEOUT: Final = 2.0
AUTH_OK: Final = 0
AUTH_CLEARTEXT: Final = 3
AUTH_MD5: Final = 5
AUTH_SASL: Final = 10
AUTH_SASL_CONTINUE: Final = 11
AUTH_SASL_FINAL: Final = 12
PROTOCOL_MAJOR: Final = 3
#: The ALPN protocol name PostgreSQL requires for direct TLS (``sslnegotiation=direct``).
ALPN_PROTOCOL: Final = "postgresql"


class ProtocolViolationError(Exception):
    """The client broke the protocol; it gets this error and the connection is closed."""

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message


class PeerGoneError(Exception):
    """The other side closed the connection while a message was expected."""


def pack_message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def error_response(sqlstate: str, message: str, hint: str | None = None) -> bytes:
    items = [(b"S", "FATAL"), (b"V", "FATAL"), (b"C", sqlstate), (b"M", message)]
    if hint is not None:
        items.append((b"H", hint))
    fields = b"".join(code + value.encode("utf-8", "replace") + b"\0" for code, value in items)
    return pack_message(b"E", fields + b"\0")


AUTH_CLEARTEXT_REQUEST: Final = pack_message(b"R", struct.pack("!I", AUTH_CLEARTEXT))


async def read_startup_packet(channel: Channel) -> tuple[int, bytes]:
    header = await channel.read_exactly(4)
    (length,) = struct.unpack("!I", header)
    if not 8 <= length <= MAX_STARTUP_PACKET:  # noqa: PLR2004
        raise ProtocolViolationError("08P01", "invalid length of startup packet")
    body = await channel.read_exactly(length - 4)
    (code,) = struct.unpack("!I", body[:4])
    return code, header + body


def startup_parameters(packet: bytes) -> dict[str, str]:
    data = packet[8:]
    if not data.endswith(b"\0"):
        raise ProtocolViolationError(
            "08P01", "invalid startup packet layout: expected terminator as last byte"
        )
    parts = data[:-1].split(b"\0")
    items = parts[:-1]
    if parts[-1] or len(items) % 2 or not all(items[::2]):
        raise ProtocolViolationError("08P01", "invalid startup packet layout")
    try:
        texts = [item.decode("utf-8") for item in items]
    except UnicodeDecodeError:
        raise ProtocolViolationError("08P01", "invalid startup packet encoding") from None
    return dict(zip(texts[::2], texts[1::2], strict=True))


async def read_message(channel: Channel, limit: int) -> tuple[bytes, bytes]:
    header = await channel.read_exactly(5)
    kind = header[:1]
    (length,) = struct.unpack("!I", header[1:])
    if not 4 <= length <= limit:  # noqa: PLR2004
        raise ProtocolViolationError("08P01", "invalid message length")
    return kind, await channel.read_exactly(length - 4)


def password_message(password: str | bytes) -> bytes:
    data = password.encode() if isinstance(password, str) else password
    return pack_message(b"p", data + b"\0")


def quote_conninfo(value: str) -> str:
    if value and not any(c in value for c in " '\\\t\n\r"):
        return value
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


def error_fields(body: bytes) -> dict[str, str]:
    """Return the fields of an ErrorResponse or NoticeResponse body, by one-letter code."""
    fields: dict[str, str] = {}
    for item in body.split(b"\0"):
        if item:
            fields[item[:1].decode("ascii", "replace")] = item[1:].decode("utf-8", "replace")
    return fields


def error_message(fields: dict[str, str]) -> bytes:
    """Return an ErrorResponse carrying ``fields`` (one-letter codes), in their order."""
    body = b"".join(
        code.encode("ascii") + value.encode("utf-8", "replace") + b"\0"
        for code, value in fields.items()
    )
    return pack_message(b"E", body + b"\0")
