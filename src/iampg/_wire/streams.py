"""Connections: the raw socket before TLS, a buffered stream that relays, listening."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import socket
from typing import TYPE_CHECKING, Final, cast

from .protocol import CLOSE_TIMEOUT, READ_LIMIT, PeerGoneError
from .tls import TlsTransport

if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable


class Channel:
    """What the startup code reads from and writes to: a raw socket or a TLS stream."""

    async def read_exactly(self, n: int) -> bytes:
        raise NotImplementedError

    async def send(self, data: bytes) -> None:
        raise NotImplementedError


class RawChannel(Channel):
    """The accepted socket before TLS: exact reads only, so nothing is read ahead."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        self._loop = loop
        self._sock = sock

    async def read_exactly(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            chunk = await self._loop.sock_recv(self._sock, n - len(data))
            if not chunk:
                raise PeerGoneError
            data += chunk
        return bytes(data)

    async def send(self, data: bytes) -> None:
        await self._loop.sock_sendall(self._sock, data)

    async def peek_first_byte(self) -> int | None:
        """Wait for the first byte and return it without consuming it; ``None`` on EOF."""
        while True:
            try:
                data = self._sock.recv(1, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                await readable(self._loop, self._sock)
                continue
            return data[0] if data else None

    def has_pending_data(self) -> bool:
        """Tell whether bytes already wait in the socket (sent without waiting for us)."""
        try:
            return bool(self._sock.recv(1, socket.MSG_PEEK))
        except (BlockingIOError, InterruptedError):
            return False


async def readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Wait until ``sock`` is readable (or, for a listener, has a connection to accept)."""
    fd = sock.fileno()
    waiter: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not waiter.done():
            waiter.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await waiter
    finally:
        loop.remove_reader(fd)


class Stream(asyncio.Protocol, Channel):
    """A buffered connection that can be switched to piping into another one."""

    def __init__(self, loop: asyncio.AbstractEventLoop, live: set[Stream]) -> None:
        self._loop = loop
        self._live = live  # the emulator's connected streams, which stop() aborts
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = loop.create_future()
        self._buffer = bytearray()
        self._eof = False
        self._reading_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._partner: Stream | None = None
        #: Bytes relayed to the partner so far.
        self.relayed = 0
        #: Called with what is relayed to the partner, just before relaying it (set before
        #: :meth:`pipe_to`, as ``transform``).
        self.on_data: Callable[[bytes], None] | None = None
        #: Returns what to relay instead of what was received (the emulator's DSQL mode).
        self.transform: Callable[[bytes], bytes] | None = None
        self._relay: Callable[[bytes], None] | None = None  # set by pipe_to

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)
        self._live.add(self)

    def data_received(self, data: bytes) -> None:
        relay = self._relay
        if relay is not None:
            self.relayed += len(data)
            relay(data)
            return
        self._buffer += data
        if len(self._buffer) > READ_LIMIT and self.transport is not None:
            self.transport.pause_reading()
            self._reading_paused = True
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        del exc  # a lost connection ends the session whatever the cause
        self._live.discard(self)
        self._eof = True
        self._wake()
        if not self.closed.done():
            self.closed.set_result(None)
        partner, self._partner, self._relay = self._partner, None, None  # no cycle left
        if partner is not None:
            partner.close()

    def pause_writing(self) -> None:
        if self._partner is not None and self._partner.transport is not None:
            self._partner.transport.pause_reading()

    def resume_writing(self) -> None:
        if self._partner is not None and self._partner.transport is not None:
            self._partner.transport.resume_reading()

    # reading and writing

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def read_exactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            if self._eof:
                raise PeerGoneError
            if self._reading_paused and self.transport is not None:
                self._reading_paused = False
                self.transport.resume_reading()
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    async def send(self, data: bytes) -> None:
        self.write(data)

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def pipe_to(self, partner: Stream) -> None:
        """Send everything received from now on (and anything buffered) to ``partner``."""
        self._partner = partner
        on_data, transform = self.on_data, self.transform
        if on_data is None and transform is None:
            self._relay = partner.write
        else:

            def relay(data: bytes) -> None:
                if on_data is not None:
                    on_data(data)
                partner.write(data if transform is None else transform(data))

            self._relay = relay
        if self._buffer:
            data = bytes(self._buffer)
            self._buffer.clear()
            self.relayed += len(data)
            self._relay(data)
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        if self._eof:
            partner.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    async def wait_closed(self, timeout: float) -> None:
        if self.transport is None:
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.closed), timeout)
        if not self.closed.done():
            self.transport.abort()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.closed), timeout)


def _find_malloc_trim() -> Callable[[], None] | None:
    """Return a call that gives the C allocator's free memory back to the system, if any.

    glibc keeps what a burst of connections freed in its arenas (the emulator's thread has
    its own) instead of returning it; ``malloc_trim(0)`` returns it. Elsewhere: None.
    """
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):  # TypeError: no CDLL(None) on Windows
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int

    def release() -> None:
        trim(0)

    return release


malloc_trim: Final = _find_malloc_trim()


async def drain_and_shutdown(sock: socket.socket, timeout: float = CLOSE_TIMEOUT) -> None:
    """Half-close, then read what the client still sends, so closing sends no RST.

    Closing a socket with unread input makes the kernel reset the connection, which can
    destroy the error message just sent before the client reads it.
    """
    loop = asyncio.get_running_loop()
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
    channel = RawChannel(loop, sock)
    deadline = loop.time() + timeout
    drained = 0
    with contextlib.suppress(OSError, asyncio.TimeoutError):
        while drained < READ_LIMIT * 16:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            chunk = await asyncio.wait_for(loop.sock_recv(sock, READ_LIMIT), remaining)
            if not chunk:
                break
            drained += len(chunk)
    del channel


def listen(host: str, port: int) -> socket.socket:
    infos = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV
    )
    family = infos[0][0]
    sock = socket.create_server((host, port), family=family, backlog=128)
    sock.setblocking(False)  # noqa: FBT003
    return sock


async def accept_tls(
    sock: socket.socket, stream: Stream, context: ssl.SSLContext, handshake_timeout: float
) -> None:
    """Run the server side of a TLS handshake on an accepted socket, then hand it to ``stream``.

    The transport owns ``sock`` from the call on. TLS is iampg's own layer on every event loop
    (:class:`~iampg._wire.tls.TlsTransport`), not the loop's.
    """
    loop = asyncio.get_running_loop()
    handshake: asyncio.Future[None] = loop.create_future()
    tls = TlsTransport(
        loop, stream, context, handshake, server_side=True, handshake_timeout=handshake_timeout
    )
    try:
        transport, _ = await loop.connect_accepted_socket(lambda: tls, sock)
    except BaseException:
        handshake.cancel()  # the transport's end fails it: nobody is left to hear it
        raise
    await _handshake(transport, handshake)


async def connect_tls(
    sock: socket.socket,
    stream: Stream,
    context: ssl.SSLContext,
    server_hostname: str | None,
    handshake_timeout: float,
) -> None:
    """Run the client side of a TLS handshake on a connected socket, then hand it to ``stream``.

    ``server_hostname`` is sent as SNI (and checked if ``context`` checks host names). The
    transport owns ``sock`` from the call on.
    """
    loop = asyncio.get_running_loop()
    handshake: asyncio.Future[None] = loop.create_future()
    tls = TlsTransport(
        loop,
        stream,
        context,
        handshake,
        server_side=False,
        server_hostname=server_hostname,
        handshake_timeout=handshake_timeout,
    )
    try:
        transport, _ = await loop.create_connection(lambda: tls, sock=sock)
    except BaseException:
        handshake.cancel()  # the transport's end fails it: nobody is left to hear it
        raise
    await _handshake(transport, handshake)


async def _handshake(transport: asyncio.Transport, handshake: asyncio.Future[None]) -> None:
    try:
        await handshake
    except BaseException:
        transport.abort()
        raise


def beyond_loopback(listen_host: str, *, unresolved: bool) -> bool:
    """Tell whether listening on ``listen_host`` accepts connections from other machines.

    ``""`` (every interface) does; ``localhost`` and loopback addresses do not; a name counts
    as beyond if any of its addresses is. ``unresolved`` is the answer for a name that does not
    resolve (listening on it fails anyway): the proxy refuses it, the emulator does not warn.
    """
    host = listen_host.strip().strip("[]")
    if not host:
        return True
    if host.lower() == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return unresolved
    return any(
        not ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos
    )


async def abort_all(streams: set[Stream], timeout: float = CLOSE_TIMEOUT) -> None:
    """Abort every stream in ``streams`` and wait (up to ``timeout``) until their sockets closed.

    A stream leaves ``streams`` (its registry) when its transport has closed the socket
    (``connection_lost``). Again while new ones appear: a transport may still be running
    ``connection_made``.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while streams and loop.time() < deadline:
        current = list(streams)
        for stream in current:
            stream.abort()
        await asyncio.wait([s.closed for s in current], timeout=deadline - loop.time())
