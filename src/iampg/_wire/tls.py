"""TLS over an event loop's TCP transport: one small layer for asyncio's loop and uvloop.

Both loops bring a TLS layer of their own, and neither suits a relay. asyncio's
(``asyncio.sslproto``) is general and runs in Python: on asyncio's loop it makes up most of
the relay's CPU per message. uvloop's is compiled, but when reading is paused (the relay pauses
a server while its client is slow) and the peer's last bytes arrive with its FIN, it drops
what it had not yet decrypted, so a slow client loses the end of a result and the server's
error (uvloop 0.23; MagicStack/uvloop#661).

:class:`TlsTransport` does only what the wire code needs, on any loop: the handshake with a
time limit, records decrypted and encrypted through memory BIOs, pausing by pausing the TCP
transport (the peer's remaining bytes and its FIN wait in the kernel, in order), close_notify on
close, and every record received before the peer ended delivered before the end is.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from typing import TYPE_CHECKING, Any, Final, cast

if TYPE_CHECKING:
    from collections.abc import Callable

#: The largest plaintext a TLS record carries.
RECORD: Final = 16 * 1024
#: Plaintext delivered at most in one ``data_received`` call: what one read of the TCP
#: transport decrypts to, when it holds several records, goes up in one piece.
DELIVERY: Final = 4 * RECORD

#: How long :meth:`TlsTransport.close` waits for the peer to end its side once it has ended
#: ours; then the connection is reset.
CLOSE_WAIT: Final = 30.0

_scratch = threading.local()
_GONE: Final = asyncio.Protocol()  # what a connection's app is once it was told of the loss


def _scratch_view() -> memoryview:
    """Return this thread's decryption buffer, shared by its connections.

    Sharing is safe within a thread: what is decrypted into it is copied out before any
    protocol code runs, and every connection runs on its loop's thread.
    """
    view: memoryview | None = getattr(_scratch, "view", None)
    if view is None:
        view = _scratch.view = memoryview(bytearray(DELIVERY))
    return view


class TlsTransport(asyncio.Transport, asyncio.Protocol):
    """The protocol of a TCP transport, and the transport of a protocol above it, with TLS between.

    The protocol above (``app``) is connected once the handshake succeeded; ``handshake``
    gets the result (None, or the exception that ended the handshake). Errors after the
    handshake end the connection: ``app.connection_lost`` gets them.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        app: asyncio.Protocol,
        context: ssl.SSLContext,
        handshake: asyncio.Future[None],
        *,
        server_side: bool,
        server_hostname: str | None = None,
        handshake_timeout: float,
    ) -> None:
        super().__init__()
        self._loop = loop
        self._app = app
        self._handshake_result = handshake
        self._handshake_timeout = handshake_timeout
        self._context = context
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(
            self._incoming,
            self._outgoing,
            server_side=server_side,
            server_hostname=None if server_side else server_hostname,
        )
        self._view = _scratch_view()
        self._read_into = cast("Callable[[int, memoryview], int]", self._tls.read)
        self._tcp: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._established = False
        self._paused = False  # the app paused reading
        self._closing = False  # close() or abort() was called, or the handshake failed
        self._peer_ended = False  # close_notify, or the TCP connection's end, was seen
        self._ended = False  # ... and the app was told
        self._lost = False  # the TCP transport is gone
        self._error: BaseException | None = None
        self._backlog: list[bytes] = []  # written while a renegotiation was under way

    # the TCP transport's protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._tcp = cast("asyncio.Transport", transport)
        self._timer = self._loop.call_later(self._handshake_timeout, self._handshake_timed_out)
        self._handshake()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return  # closing: read only to see the peer's end, and so never reset (close())
        self._incoming.write(data)
        if self._established:
            self._read()
            if self._backlog:
                self._write_backlog()
        elif not self._handshake_result.done():
            self._handshake()

    def eof_received(self) -> bool:
        if self._closing:
            return False  # the end close() waits for: the TCP transport closes now
        if not self._established:
            self._fail_handshake(ConnectionResetError("the peer closed during the TLS handshake"))
            return False
        self._peer_ended = True
        self._read()
        return True  # the TCP transport stays open for writing until the app closes

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._closing = True  # nothing more reaches the app, even what waits in the BIO
        if self._timer is not None:
            self._timer.cancel()
        if not self._established:
            self._fail_handshake(exc or ConnectionResetError("the connection closed"))
            return
        app, self._app = self._app, _GONE  # no cycle with the app: freed without the GC
        app.connection_lost(cast("Exception | None", self._error or exc))

    def pause_writing(self) -> None:
        if self._established:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        if self._established:
            self._app.resume_writing()

    # the handshake

    def _handshake(self) -> None:
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, ssl.CertificateError, ValueError) as exc:
            self._flush()  # the alert that says why, if OpenSSL made one
            self._fail_handshake(exc)
            return
        self._flush()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._established = True
        try:
            self._app.connection_made(self)
        except BaseException as exc:
            if not self._handshake_result.done():
                self._handshake_result.set_exception(exc)
            raise
        if not self._handshake_result.done():
            self._handshake_result.set_result(None)
        if self._incoming.pending:  # the app's first bytes came with the handshake's last
            self._read()

    def _handshake_timed_out(self) -> None:
        self._timer = None
        if not self._established:
            timeout = self._handshake_timeout
            self._fail_handshake(
                ConnectionAbortedError(f"the TLS handshake took longer than {timeout:g} s")
            )

    def _fail_handshake(self, exc: BaseException) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._handshake_result.done():
            self._handshake_result.set_exception(exc)
        self._closing = True
        if self._tcp is not None and not self._lost:
            self._tcp.close()  # after the alert, if any, went out

    # reading

    def _read(self) -> None:  # noqa: C901, PLR0912 -- the hot path, in one frame
        """Decrypt what has arrived and hand it to the app, unless it paused reading.

        Records that arrived together go up together, up to :data:`DELIVERY` bytes at a time;
        what decrypts before an error goes up before the error. Once the peer ended
        (close_notify, or the TCP connection's end), the app is told after everything
        received before: at once, or when it resumes reading. A record cut short by the end
        is dropped, as TLS requires.
        """
        if self._paused or self._ended or self._closing:
            return
        read_into, pending, view = self._read_into, self._tls.pending, self._view
        incoming, deliver = self._incoming, self._app.data_received
        filled = 0
        drained = True
        try:
            while True:
                if filled > DELIVERY - RECORD:
                    deliver(bytes(view[:filled]))
                    filled = 0
                    if self._held():  # by the app, in data_received
                        drained = False
                        break
                got = read_into(RECORD, view[filled:])
                if not got:  # close_notify
                    self._close_notified()
                    break
                filled += got
                if not incoming.pending and not pending():
                    break
        except ssl.SSLWantReadError:
            pass  # a record not whole yet, or one that carried no data (a session ticket)
        except ssl.SSLZeroReturnError:
            self._close_notified()
        except ssl.SSLError as exc:
            if filled:
                deliver(bytes(view[:filled]))
            self._fatal(exc)
            return
        if filled:
            deliver(bytes(view[:filled]))
        if self._outgoing.pending:  # a reply the records called for (a key update)
            self._flush()
        if self._peer_ended and drained and not self._paused:
            self._end()

    def _held(self) -> bool:
        return self._paused or self._closing

    def _close_notified(self) -> None:
        self._peer_ended = True
        self._incoming.read()  # what comes after close_notify is ignored (RFC 8446 6.1)

    def _end(self) -> None:
        """Tell the app the peer ended, once everything it sent before has been delivered."""
        if self._ended:
            return
        self._ended = True
        if not self._app.eof_received():
            self.close()

    def _fatal(self, exc: BaseException) -> None:
        self._error = exc
        self._closing = True
        if self._tcp is not None and not self._lost:
            self._tcp.abort()

    # the app's transport

    def write(self, data: bytes | bytearray | memoryview) -> None:
        tcp = self._tcp
        if self._closing or self._lost or not self._established or not data or tcp is None:
            return
        if self._backlog:
            self._backlog.append(bytes(data))
            return
        try:
            self._tls.write(data)
        except ssl.SSLWantReadError:  # a renegotiation under way: written once it is done
            self._backlog.append(bytes(data))
        except ssl.SSLError as exc:
            self._fatal(exc)
            return
        tcp.write(self._outgoing.read())

    def _write_backlog(self) -> None:
        backlog = self._backlog
        while backlog and not self._closing:
            try:
                self._tls.write(backlog[0])
            except ssl.SSLWantReadError:
                break
            except ssl.SSLError as exc:
                self._fatal(exc)
                return
            del backlog[0]
        self._flush()

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def _flush(self) -> None:
        if self._outgoing.pending and self._tcp is not None and not self._lost:
            self._tcp.write(self._outgoing.read())

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        msg = "TLS cannot half-close a connection"
        raise NotImplementedError(msg)

    def pause_reading(self) -> None:
        if self._paused:
            return
        self._paused = True
        if self._tcp is not None and not self._lost:
            self._tcp.pause_reading()  # the peer's bytes, and its FIN, wait in the kernel

    def resume_reading(self) -> None:
        if not self._paused:
            return
        self._paused = False
        if self._tcp is not None and not self._lost and not self._peer_ended:
            self._tcp.resume_reading()
        self._loop.call_soon(self._resumed)

    def _resumed(self) -> None:
        if self._paused or not self._established:
            return
        try:
            self._read()
        except Exception as exc:  # noqa: BLE001 -- the app's: ends it, as the loop would
            self._loop.call_exception_handler(
                {
                    "message": "Fatal error: protocol.data_received() call failed.",
                    "exception": exc,
                    "transport": self,
                    "protocol": self._app,
                }
            )
            self._fatal(exc)

    def is_reading(self) -> bool:
        return not self._paused and not self._closing and not self._lost

    def is_closing(self) -> bool:
        return self._closing or self._lost

    def close(self) -> None:
        """End the connection without losing what was written.

        close_notify goes out after what is written, then the TCP connection's end (FIN);
        what the peer still sends is read and dropped, as closing a socket with unread input
        makes the kernel reset the connection and drop what it has not yet sent. The TCP
        transport closes at the peer's end, or after :data:`CLOSE_WAIT` seconds.
        """
        if self._closing:
            return
        self._closing = True
        tcp = self._tcp
        if tcp is None or self._lost:
            return
        if not self._established:
            tcp.close()
            return
        with contextlib.suppress(ssl.SSLError):  # SSLWantReadError: the peer's is not awaited
            self._tls.unwrap()
        self._flush()
        if self._peer_ended:  # its FIN was read: no input is left to cause a reset
            tcp.close()
            return
        if not tcp.can_write_eof():
            tcp.close()
            return
        try:
            tcp.write_eof()
        except OSError:  # the peer's reset arrived first: nothing more can go out
            tcp.abort()
            return
        tcp.resume_reading()
        self._timer = self._loop.call_later(CLOSE_WAIT, tcp.abort)

    def abort(self) -> None:
        self._closing = True
        if self._tcp is not None and not self._lost:
            self._tcp.abort()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._tls
        if name == "sslcontext":
            return self._context
        if name in {"peercert", "cipher", "compression"}:
            if not self._established:
                return default
            if name == "peercert":
                return self._tls.getpeercert()
            return self._tls.cipher() if name == "cipher" else self._tls.compression()
        return default if self._tcp is None else self._tcp.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._app = cast("asyncio.Protocol", protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._app

    def get_write_buffer_size(self) -> int:
        return 0 if self._tcp is None else self._tcp.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (0, 0) if self._tcp is None else self._tcp.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._tcp is not None:
            self._tcp.set_write_buffer_limits(high, low)

    def __repr__(self) -> str:
        state = "closing" if self._closing else "open" if self._established else "handshake"
        flags = (" paused", self._paused), (" peer ended", self._peer_ended), (" lost", self._lost)
        return f"<TlsTransport {state}{''.join(name for name, on in flags if on)}>"
