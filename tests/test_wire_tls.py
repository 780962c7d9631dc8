"""iampg's TLS layer (``_wire/tls.py``) against Python's own TLS sockets, on both event loops."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from iampg._wire.lifecycle import loop_factory
from iampg._wire.streams import accept_tls, connect_tls
from iampg._wire.tls import TlsTransport

HOST = "localhost"


class Recorder(asyncio.Protocol):
    """What a protocol above the TLS layer is told, in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.transport: TlsTransport | None = None
        self.data = bytearray()
        self.events: list[str] = []
        self.lost: asyncio.Future[BaseException | None] = loop.create_future()
        self.changed = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, TlsTransport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data
        if not self.events or self.events[-1] != "data":
            self.events.append("data")
        self.changed.set()

    def eof_received(self) -> bool:
        self.events.append("eof")
        self.changed.set()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")
        self.lost.set_result(exc)
        self.changed.set()

    async def one_delivery(self) -> None:
        """Resume reading, take one delivery and pause again, as a relay whose partner is full."""
        transport = self.transport
        assert transport is not None

        def pause_after(data: bytes) -> None:
            Recorder.data_received(self, data)
            transport.pause_reading()

        self.data_received = pause_after  # type: ignore[method-assign]
        transport.resume_reading()
        await self.until(lambda: len(self.data) > 0)
        await asyncio.sleep(0.1)
        del self.data_received  # the class's again

    async def until(self, done: Callable[[], bool], timeout: float = 10.0) -> None:
        async def wait() -> None:
            while not done():
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(wait(), timeout)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from iampg.emulator._tls import make_certificates

    return make_certificates([HOST], tmp_path_factory.mktemp("tls"), loopback=True)


@pytest.fixture
def server_context(certificates: Any) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificates.cert_file, certificates.key_file)
    return context


@pytest.fixture
def client_context(certificates: Any) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certificates.ca_file))


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        sock.settimeout(10)
        yield sock


@contextlib.contextmanager
def serving(target: Callable[[socket.socket], None], listener: socket.socket) -> Iterator[None]:
    """Run ``target`` on the next accepted connection, in a thread; re-raise what it raised."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(10)
                target(conn)
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield
    thread.join(15)
    assert not thread.is_alive(), "the TLS peer did not finish"
    if failure:
        raise failure[0]


def run_on(kind: str, main: Callable[[asyncio.AbstractEventLoop], Any]) -> Any:
    loop = loop_factory(kind)()
    try:
        return loop.run_until_complete(main(loop))
    finally:
        loop.close()


async def connect(
    loop: asyncio.AbstractEventLoop,
    listener: socket.socket,
    context: ssl.SSLContext,
    *,
    server_hostname: str = HOST,
    timeout: float = 10.0,
) -> Recorder:
    sock = socket.create_connection(listener.getsockname(), timeout=10)
    sock.setblocking(False)
    app = Recorder(loop)
    await connect_tls(sock, app, context, server_hostname, timeout)  # type: ignore[arg-type]
    return app


class Memory:
    """The far end's TLS over memory BIOs, to choose what reaches the socket and when."""

    def __init__(self, conn: socket.socket, context: ssl.SSLContext) -> None:
        self.conn = conn
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        for _ in range(100):
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.conn.sendall(self.outgoing.read())
                self.incoming.write(self.conn.recv(65536))
        self.conn.sendall(self.outgoing.read())  # Finished, and TLS 1.3's session tickets

    def receive(self, n: int) -> bytes:
        got = bytearray()
        while len(got) < n:
            if self.incoming.pending or self.tls.pending():
                with contextlib.suppress(ssl.SSLWantReadError):
                    got += self.tls.read(n - len(got))
                    continue
            data = self.conn.recv(65536)
            if not data:
                break
            self.incoming.write(data)
        return bytes(got)

    def records(self, payload: bytes) -> bytes:
        """Return ``payload`` encrypted, not yet sent."""
        self.tls.write(payload)
        return self.outgoing.read()

    def close_notify(self) -> bytes:
        with contextlib.suppress(ssl.SSLWantReadError):
            self.tls.unwrap()
        return self.outgoing.read()


def test_a_mebibyte_goes_each_way_intact(
    event_loop_kind: str,
    listener: socket.socket,
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
) -> None:
    """Many records per read, partial records, and the TCP transport's flow control."""
    payload = os.urandom(1 << 20)

    def echo(conn: socket.socket) -> None:
        with server_context.wrap_socket(conn, server_side=True) as tls:
            received = 0
            while received < len(payload):
                chunk = tls.recv(65536)
                assert chunk
                received += len(chunk)
                tls.sendall(chunk)

    async def main(loop: asyncio.AbstractEventLoop) -> bytes:
        app = await connect(loop, listener, client_context)
        assert app.transport is not None
        for start in range(0, len(payload), 100_000):
            app.transport.write(payload[start : start + 100_000])
        await app.until(lambda: len(app.data) >= len(payload))
        app.transport.close()
        await asyncio.wait_for(app.lost, 10)
        return bytes(app.data)

    with serving(echo, listener):
        assert run_on(event_loop_kind, main) == payload


def test_a_record_split_across_reads_is_delivered_whole(
    event_loop_kind: str,
    listener: socket.socket,
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
) -> None:
    message = b"one record, sent a few bytes at a time"

    def dribble(conn: socket.socket) -> None:
        peer = Memory(conn, server_context)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        records = peer.records(message)
        for start in range(0, len(records), 7):
            conn.sendall(records[start : start + 7])
            time.sleep(0.005)
        assert peer.receive(2) == b"ok"

    async def main(loop: asyncio.AbstractEventLoop) -> bytes:
        app = await connect(loop, listener, client_context)
        assert app.transport is not None
        await app.until(lambda: len(app.data) >= len(message))
        app.transport.write(b"ok")
        app.transport.close()
        await asyncio.wait_for(app.lost, 10)
        return bytes(app.data)

    with serving(dribble, listener):
        assert run_on(event_loop_kind, main) == message


@pytest.mark.parametrize("notify", [True, False], ids=["close_notify", "fin-only"])
def test_a_paused_reader_gets_the_peer_s_last_bytes_then_the_end(
    event_loop_kind: str,
    listener: socket.socket,
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
    notify: bool,
) -> None:
    """The peer's last records, its close_notify (or not) and FIN, all while reading is paused.

    Delivered on resume, in order: the data, then the end. uvloop's own TLS loses the data.
    """
    payload = os.urandom(300_000)
    go = threading.Event()
    sent = threading.Event()

    def last_words(conn: socket.socket) -> None:
        peer = Memory(conn, server_context)
        go.wait(10)
        records = peer.records(payload)
        conn.sendall(records + (peer.close_notify() if notify else b""))
        conn.shutdown(socket.SHUT_WR)
        sent.set()
        with contextlib.suppress(OSError):
            while conn.recv(65536):  # the client's close_notify, then its FIN
                pass

    async def main(loop: asyncio.AbstractEventLoop) -> tuple[bytes, list[str]]:
        app = await connect(loop, listener, client_context)
        assert app.transport is not None
        app.transport.pause_reading()
        go.set()
        await loop.run_in_executor(None, sent.wait, 10)
        await asyncio.sleep(0.2)  # time for a loop to see data and FIN, were it reading
        assert app.data == b""
        assert not app.lost.done()
        app.transport.resume_reading()
        await asyncio.wait_for(app.lost, 10)
        return bytes(app.data), app.events

    with serving(last_words, listener):
        data, events = run_on(event_loop_kind, main)
    assert data == payload
    assert events == ["data", "eof", "lost"]


def test_close_sends_close_notify(
    event_loop_kind: str,
    listener: socket.socket,
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
) -> None:
    """The peer sees a clean end (Python's TLS socket reads b""), not a truncated stream."""
    ended: list[bytes] = []

    def read_to_the_end(conn: socket.socket) -> None:
        with server_context.wrap_socket(conn, server_side=True, suppress_ragged_eofs=False) as tls:
            data = tls.recv(100)
            ended.append(data)
            ended.append(tls.recv(100))  # SSLEOFError here without close_notify

    async def main(loop: asyncio.AbstractEventLoop) -> None:
        app = await connect(loop, listener, client_context)
        assert app.transport is not None
        app.transport.write(b"bye")
        app.transport.close()
        assert app.transport.is_closing()
        await asyncio.wait_for(app.lost, 10)

    with serving(read_to_the_end, listener):
        run_on(event_loop_kind, main)
    assert ended == [b"bye", b""]


def test_pausing_holds_back_data_until_resumed(
    event_loop_kind: str,
    listener: socket.socket,
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
) -> None:
    paused = threading.Event()

    def talk(conn: socket.socket) -> None:
        with server_context.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(b"first")
            paused.wait(10)
            tls.sendall(b"second")
            assert tls.recv(4) == b"done"

    async def main(loop: asyncio.AbstractEventLoop) -> bytes:
        app = await connect(loop, listener, client_context)
        assert app.transport is not None
        await app.until(lambda: app.data == b"first")
        app.transport.pause_reading()
        assert not app.transport.is_reading()
        paused.set()
        await asyncio.sleep(0.2)
        held = bytes(app.data)
        app.transport.resume_reading()
        await app.until(lambda: len(app.data) >= len(b"firstsecond"))
        app.transport.write(b"done")
        app.transport.close()
        await asyncio.wait_for(app.lost, 10)
        return held

    with serving(talk, listener):
        assert run_on(event_loop_kind, main) == b"first"


def test_a_certificate_for_another_name_fails_the_handshake(
    event_loop_kind: str,
    listener: socket.socket,
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
) -> None:
    def handshake(conn: socket.socket) -> None:
        with contextlib.suppress(ssl.SSLError, OSError):
            server_context.wrap_socket(conn, server_side=True).close()

    async def main(loop: asyncio.AbstractEventLoop) -> None:
        await connect(loop, listener, client_context, server_hostname="elsewhere.example")

    with serving(handshake, listener), pytest.raises(ssl.SSLCertVerificationError):
        run_on(event_loop_kind, main)


def test_a_handshake_that_never_comes_times_out(
    event_loop_kind: str, listener: socket.socket, client_context: ssl.SSLContext
) -> None:
    def silent(conn: socket.socket) -> None:
        conn.recv(65536)  # the ClientHello, unanswered
        assert conn.recv(65536) == b""  # until the client gives up and closes

    async def main(loop: asyncio.AbstractEventLoop) -> float:
        started = loop.time()
        with pytest.raises(ConnectionAbortedError, match=r"longer than 0\.3 s"):
            await connect(loop, listener, client_context, timeout=0.3)
        return loop.time() - started

    with serving(silent, listener):
        assert run_on(event_loop_kind, main) < 5


def test_the_server_side_hands_over_bytes_sent_with_the_handshake(
    event_loop_kind: str,
    tmp_path: Path,
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
) -> None:
    """A client's first message in the same packets as its handshake's end is not lost."""
    del tmp_path
    with socket.create_server(("127.0.0.1", 0)) as listening:
        address = listening.getsockname()

        def client() -> None:
            with (
                socket.create_connection(address, timeout=10) as raw,
                client_context.wrap_socket(raw, server_hostname=HOST) as tls,
            ):
                tls.sendall(b"startup")
                assert tls.recv(2) == b"ok"

        async def main(loop: asyncio.AbstractEventLoop) -> bytes:
            listening.setblocking(False)
            thread = threading.Thread(target=client, daemon=True)
            thread.start()
            sock, _ = await loop.sock_accept(listening)
            app = Recorder(loop)
            await accept_tls(sock, app, server_context, 10.0)  # type: ignore[arg-type]
            assert app.transport is not None
            await app.until(lambda: len(app.data) >= len(b"startup"))
            app.transport.write(b"ok")
            await asyncio.wait_for(app.lost, 10)
            await loop.run_in_executor(None, thread.join, 10)
            return bytes(app.data)

        assert run_on(event_loop_kind, main) == b"startup"


def test_a_record_cut_short_by_the_end_is_dropped_and_the_end_delivered(
    event_loop_kind: str,
    listener: socket.socket,
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
) -> None:
    """Records whole before the FIN are delivered, the cut one is not, then the end."""

    def cut(conn: socket.socket) -> None:
        peer = Memory(conn, server_context)
        whole = peer.records(b"whole")
        conn.sendall(whole + peer.records(b"never seen")[:10])
        conn.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            while conn.recv(65536):
                pass

    async def main(loop: asyncio.AbstractEventLoop) -> tuple[bytes, list[str]]:
        app = await connect(loop, listener, client_context)
        await asyncio.wait_for(app.lost, 10)
        return bytes(app.data), app.events

    with serving(cut, listener):
        assert run_on(event_loop_kind, main) == (b"whole", ["data", "eof", "lost"])


def test_nothing_reaches_the_app_after_the_connection_is_lost(
    event_loop_kind: str,
    listener: socket.socket,
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
) -> None:
    """Records left undelivered while paused stay so once the connection is lost (a reset)."""
    go, sent, reset = threading.Event(), threading.Event(), threading.Event()

    def reset_after_sending(conn: socket.socket) -> None:
        peer = Memory(conn, server_context)
        go.wait(10)
        conn.sendall(peer.records(os.urandom(300_000)))
        sent.set()
        reset.wait(10)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    async def main(loop: asyncio.AbstractEventLoop) -> tuple[list[str], int]:
        app = await connect(loop, listener, client_context)
        transport = app.transport
        assert transport is not None
        transport.pause_reading()
        go.set()
        await loop.run_in_executor(None, sent.wait, 10)
        await asyncio.sleep(0.2)
        await app.one_delivery()
        assert 0 < len(app.data) < 300_000  # the rest waits, some of it decrypted-ready
        reset.set()
        for _ in range(50):  # a write meets the reset: the connection is lost
            transport.write(b"y" * 1000)
            await asyncio.sleep(0.02)
            if app.lost.done():
                break
        assert isinstance(app.lost.result(), ConnectionError)
        delivered = len(app.data)
        transport.resume_reading()  # as the relay does once its partner drained
        await asyncio.sleep(0.2)
        return app.events, len(app.data) - delivered

    with serving(reset_after_sending, listener):
        events, after = run_on(event_loop_kind, main)
    assert events[-1] == "lost"
    assert after == 0


def test_close_delivers_what_was_written_to_a_peer_that_still_sends(
    event_loop_kind: str,
    listener: socket.socket,
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
) -> None:
    """Input unread at close would make the kernel reset the connection and drop the rest.

    As when a relay closes a client's connection after a result while the client sends its
    Terminate, and reads slowly.
    """
    size = 4 << 20
    got: list[object] = []
    spoke = threading.Event()

    def talk_while_reading_slowly(conn: socket.socket) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
        with server_context.wrap_socket(conn, server_side=True, suppress_ragged_eofs=False) as tls:
            spoke.set()
            time.sleep(0.3)
            tls.sendall(b"X" * 100)  # after the other side closed
            time.sleep(0.5)
            received = 0
            while chunk := tls.recv(65536):
                received += len(chunk)
            got.append(received)

    async def main(loop: asyncio.AbstractEventLoop) -> None:
        app = await connect(loop, listener, client_context)
        assert app.transport is not None
        await loop.run_in_executor(None, spoke.wait, 10)
        app.transport.write(b"D" * size)
        app.transport.close()
        await asyncio.wait_for(app.lost, 20)

    with serving(talk_while_reading_slowly, listener):
        run_on(event_loop_kind, main)
    assert got == [size]  # and a clean close_notify: no SSLEOFError in the peer


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_a_write_during_a_renegotiation_goes_out_after_it(
    event_loop_kind: str, certificates: Any, client_context: ssl.SSLContext
) -> None:
    """TLS 1.2: while the server renegotiates, OpenSSL cannot take application data yet."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    files = ["-cert", str(certificates.cert_file), "-key", str(certificates.key_file)]
    command = ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-tls1_2", *files]
    server = subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    stdin = server.stdin
    assert stdin is not None
    try:
        for _ in range(100):  # until it listens
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            time.sleep(0.05)

        async def main(loop: asyncio.AbstractEventLoop) -> bool:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.setblocking(False)
            app = Recorder(loop)
            await connect_tls(sock, app, client_context, HOST, 5.0)  # type: ignore[arg-type]
            assert app.transport is not None
            deadline = loop.time() + 1.0
            renegotiations = 0
            while loop.time() < deadline and not app.lost.done():
                app.transport.write(b"x")
                if renegotiations < 5 and loop.time() > deadline - 1.0 + renegotiations * 0.15:
                    stdin.write(b"r\n")  # s_server: renegotiate
                    stdin.flush()
                    renegotiations += 1
                await asyncio.sleep(0)
            alive = not app.lost.done()
            app.transport.close()
            await asyncio.wait_for(app.lost, 10)
            return alive

        assert run_on(event_loop_kind, main)
    finally:
        server.kill()
        server.wait(timeout=10)
        stdin.close()


def test_cancelled_while_connecting_leaves_no_unretrieved_error(
    event_loop_kind: str,
    listener: socket.socket,
    client_context: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """As when a connect's time limit runs out: no 'exception was never retrieved' logged."""

    async def main(loop: asyncio.AbstractEventLoop) -> None:
        sock = socket.create_connection(listener.getsockname(), timeout=10)
        sock.setblocking(False)
        app = Recorder(loop)
        task = loop.create_task(connect_tls(sock, app, client_context, HOST, 5.0))  # type: ignore[arg-type]
        await asyncio.sleep(0)  # inside create_connection
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.2)
        del task
        gc.collect()

    run_on(event_loop_kind, main)
    gc.collect()
    assert "never retrieved" not in caplog.text


def test_an_app_that_fails_on_resumed_data_loses_its_connection(
    event_loop_kind: str,
    listener: socket.socket,
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
) -> None:
    """Records held back while paused, delivered on resume: the app fails, the connection ends.

    As when it fails on data that comes straight from the TCP transport.
    """
    sent = threading.Event()

    def send_then_wait(conn: socket.socket) -> None:
        peer = Memory(conn, server_context)
        conn.sendall(peer.records(os.urandom(100_000)))  # more than a delivery, one TCP read
        sent.set()
        with contextlib.suppress(OSError):
            conn.recv(1)  # until the client is gone

    class AppError(Exception):
        pass

    async def main(loop: asyncio.AbstractEventLoop) -> BaseException | None:
        loop.set_exception_handler(lambda _loop, _context: None)  # the loop's report: not here
        app = await connect(loop, listener, client_context)
        transport = app.transport
        assert transport is not None
        transport.pause_reading()
        await loop.run_in_executor(None, sent.wait, 10)
        await asyncio.sleep(0.1)
        await app.one_delivery()
        assert transport._incoming.pending  # records wait in the layer, none in the kernel

        def fail(data: bytes) -> None:
            raise AppError(len(data))

        app.data_received = fail  # type: ignore[method-assign]
        transport.resume_reading()
        return await asyncio.wait_for(app.lost, 10)

    with serving(send_then_wait, listener):
        assert isinstance(run_on(event_loop_kind, main), AppError)
