"""Which event loop the proxy runs on, and that iampg's TLS layer carries the relay on each."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest

from iampg import ConfigurationError
from iampg._wire.lifecycle import loop_factory, uvloop_installed
from iampg._wire.protocol import PeerGoneError
from iampg._wire.streams import Stream, connect_tls
from iampg._wire.tls import TlsTransport
from iampg.emulator import Emulator
from iampg.proxy import Proxy
from proxy_support import ProxyFactory, eventually
from support import endpoint_for

pytestmark = pytest.mark.usefixtures("quiet_botocore")


def test_an_unknown_event_loop_is_refused_when_the_proxy_is_made(
    emulator_endpoint: object,
) -> None:
    with pytest.raises(ConfigurationError, match="event_loop must be one of auto, asyncio, uv"):
        Proxy(emulator_endpoint, event_loop="trio")  # type: ignore[arg-type]


def test_asyncio_is_asyncio_s_selector_loop() -> None:
    loop = loop_factory("asyncio")()
    try:
        assert isinstance(loop, asyncio.SelectorEventLoop)
    finally:
        loop.close()


def test_without_uvloop_auto_is_asyncio_and_uvloop_says_what_to_install() -> None:
    """In a process where uvloop cannot be imported (as without the ``proxy`` extra)."""
    code = (
        "import sys; sys.modules['uvloop'] = None\n"
        "import importlib.util, asyncio\n"
        "importlib.util.find_spec = lambda name, *a: None if name == 'uvloop' else None\n"
        "from iampg._wire.lifecycle import loop_factory\n"
        "from iampg import ConfigurationError\n"
        "assert loop_factory('auto') is asyncio.SelectorEventLoop\n"
        "assert loop_factory('auto') is asyncio.SelectorEventLoop\n"
        "try:\n"
        "    loop_factory('uvloop')\n"
        "except ConfigurationError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "pip install 'iampg[proxy]'" in done.stdout


def test_a_uvloop_that_does_not_import_leaves_auto_on_asyncio(tmp_path: Path) -> None:
    """uvloop installed but broken (built for another Python): ``auto`` warns once, uses asyncio.

    ``uvloop`` asked for by name still fails, naming the import error.
    """
    broken = tmp_path / "uvloop"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('undefined symbol: PyFake')\n")
    code = (
        "import asyncio, logging\n"
        "logging.basicConfig(format='%(levelname)s %(message)s')\n"
        "from iampg._wire.lifecycle import loop_factory\n"
        "from iampg import ConfigurationError\n"
        "assert loop_factory('auto') is asyncio.SelectorEventLoop\n"
        "assert loop_factory('auto') is asyncio.SelectorEventLoop\n"
        "try:\n"
        "    loop_factory('uvloop')\n"
        "except ConfigurationError as exc:\n"
        "    print(exc)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=env,
    )
    assert done.stderr.count("WARNING uvloop is installed but cannot be imported") == 1
    assert "undefined symbol: PyFake" in done.stdout


@pytest.mark.skipif(not uvloop_installed(), reason="uvloop is not installed")
def test_auto_is_uvloop_when_installed() -> None:
    import uvloop

    loop = loop_factory("auto")()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()


@pytest.mark.skipif(not uvloop_installed(), reason="uvloop is not installed")
def test_a_proxy_runs_on_uvloop_by_default_where_it_is_installed(
    emulator_endpoint: object, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="iampg.proxy")
    with (
        Proxy(emulator_endpoint, grace=0.0) as proxy,  # type: ignore[arg-type]
        psycopg.connect(proxy.conninfo) as conn,
    ):
        assert conn.execute("select 1").fetchone() == (1,)
    (listening,) = [r for r in caplog.records if r.getMessage().startswith("proxy listening")]
    assert listening.iampg_proxy["event_loop"] == "uvloop"  # type: ignore[attr-defined]


def test_the_upstream_tls_is_iampg_s_own_layer_on_either_loop(
    emulator_endpoint: object, start_proxy: ProxyFactory
) -> None:
    """Not the loop's: asyncio's runs in Python, uvloop's loses data at a FIN (below)."""
    proxy = start_proxy(emulator_endpoint)
    with psycopg.connect(proxy.conninfo) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        (session,) = proxy._open
        assert session.upstream is not None
        assert isinstance(session.upstream.transport, TlsTransport)
    assert eventually(lambda: proxy.stats().closed == 1)


def _serve_then_close_at_once(
    listener: socket.socket, context: ssl.SSLContext, payload: bytes
) -> None:
    """Send ``payload`` once the client says so, then end as PostgreSQL ends a session.

    OpenSSL's one-way shutdown: close_notify, then the socket closed at once, without
    waiting for the client's close_notify (asyncio's TLS, the emulator's, waits for it).
    """
    conn, _ = listener.accept()
    with conn:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_side=True)

        def receive() -> bool:
            conn.sendall(outgoing.read())
            data = conn.recv(65536)
            incoming.write(data)
            return bool(data)

        for _ in range(100):
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if not receive():
                    return
        for _ in range(100):  # the client's go
            try:
                tls.read(1)
                break
            except ssl.SSLWantReadError:
                if not receive():
                    return
        tls.write(payload)
        with contextlib.suppress(ssl.SSLWantReadError):
            tls.unwrap()
        conn.sendall(outgoing.read())


def test_a_server_s_last_bytes_reach_a_paused_reader_after_it_closed(
    tmp_path: Path, event_loop_kind: str
) -> None:
    """The server's last bytes, close_notify and FIN arrive while the relay pauses reading.

    As when a slow client reads a result and the server ends the session (a FATAL error,
    pg_terminate_backend, a failover): the relay resumes reading once the client caught up,
    and must still get those bytes. uvloop's own TLS drops what it had not yet decrypted
    when the FIN arrives while reading is paused (uvloop 0.23), which is why iampg's layer
    carries TLS on uvloop too.
    """
    from iampg.emulator._tls import make_certificates

    files = make_certificates(["localhost"], tmp_path, loopback=True)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(files.cert_file, files.key_file)
    payload = bytes(range(256)) * 400  # 100 KiB: less than uvloop's TLS read buffer
    listener = socket.create_server(("127.0.0.1", 0))
    server = threading.Thread(
        target=_serve_then_close_at_once, args=(listener, server_context, payload)
    )
    server.start()

    async def receive() -> bytes:
        loop = asyncio.get_running_loop()
        sock = socket.create_connection(listener.getsockname(), timeout=10)
        sock.setblocking(False)
        stream = Stream(loop, set())
        context = ssl.create_default_context(cafile=str(files.ca_file))
        await connect_tls(sock, stream, context, "localhost", 10.0)
        assert stream.transport is not None
        stream.transport.pause_reading()  # as the relay does while its client is slow
        stream.write(b"g")
        await loop.run_in_executor(None, server.join, 10)  # the server has closed
        for _ in range(100):  # a while for the loop to see the FIN
            if stream.closed.done():
                break
            await asyncio.sleep(0.01)
        stream.transport.resume_reading()  # the client caught up
        try:
            return await asyncio.wait_for(stream.read_exactly(len(payload)), 10)
        except PeerGoneError:
            return b""
        finally:
            stream.abort()

    loop = loop_factory(event_loop_kind)()
    try:
        received = loop.run_until_complete(receive())
    finally:
        loop.close()
        listener.close()
        server.join(10)
    assert received == payload


def test_the_upstream_host_is_resolved_by_python_s_resolver_on_either_loop(
    emulator: Emulator, start_proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the process set up in socket.getaddrinfo holds on uvloop too (libuv's would not)."""
    real = socket.getaddrinfo
    asked: list[str] = []

    def resolve(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == emulator.host:
            asked.append(host)
            host = "127.0.0.1"
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    proxy = start_proxy(endpoint_for(emulator, hostaddr=None))  # the name only, no address
    with psycopg.connect(proxy.conninfo) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    assert asked == [emulator.host]
