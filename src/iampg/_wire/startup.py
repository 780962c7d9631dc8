"""The server side of connection startup: encryption negotiation and startup packets."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .protocol import (
    ALPN_PROTOCOL,
    CANCEL_REQUEST,
    GSSENC_REQUEST,
    MAX_NEGOTIATIONS,
    PROTOCOL_MAJOR,
    SSL_REQUEST,
    ProtocolViolationError,
    read_startup_packet,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from .streams import Channel, RawChannel, Stream


def require_alpn(stream: Stream) -> None:
    """Check that a direct TLS connection negotiated PostgreSQL's ALPN protocol.

    Raises:
        ProtocolViolationError: It did not, as PostgreSQL refuses it.
    """
    transport = stream.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None or ssl_object.selected_alpn_protocol() != ALPN_PROTOCOL:
        raise ProtocolViolationError(
            "08P01",
            "received direct SSL connection request without ALPN protocol negotiation extension",
        )


async def read_startup(
    raw: RawChannel,
    client: Callable[[], Channel | None],
    start_tls: Callable[[], Awaitable[object]],
    on_cancel: Callable[[bytes], Awaitable[None]],
    *,
    tls: bool = True,
) -> bytes | None:
    """Negotiate encryption; return the StartupMessage, or None after a CancelRequest.

    Args:
        raw: The accepted socket, before TLS.
        client: Returns the encrypted channel once TLS is up, else None.
        start_tls: Runs the TLS handshake after ``S`` was sent.
        on_cancel: Handles a CancelRequest packet (header included).
        tls: Whether TLS is offered; without it an SSLRequest is answered ``N``.

    Raises:
        ProtocolViolationError: The client broke the protocol.
        PeerGoneError: The client went away.
    """
    negotiations = 0
    while True:
        encrypted = client()
        channel: Channel = raw if encrypted is None else encrypted
        code, packet = await read_startup_packet(channel)
        if code == CANCEL_REQUEST:
            await on_cancel(packet)
            return None
        if code not in (SSL_REQUEST, GSSENC_REQUEST):
            major, minor = code >> 16, code & 0xFFFF
            if major != PROTOCOL_MAJOR:
                raise ProtocolViolationError(
                    "0A000",
                    f"unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.2",
                )
            return packet
        negotiations += 1
        if encrypted is not None or negotiations > MAX_NEGOTIATIONS:
            raise ProtocolViolationError("08P01", "encryption requested on an encrypted connection")
        if len(packet) != 8:  # noqa: PLR2004
            raise ProtocolViolationError("08P01", "invalid length of startup packet")
        if code == GSSENC_REQUEST or not tls:
            await raw.send(b"N")
            continue
        if raw.has_pending_data():
            raise ProtocolViolationError("08P01", "received unencrypted data after SSL request")
        await raw.send(b"S")
        await start_tls()
