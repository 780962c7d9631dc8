"""The proxy's test fixtures (a plugin of tests/conftest.py) and a raw protocol client."""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from iampg import Endpoint
from iampg._wire.lifecycle import uvloop_installed
from iampg.emulator import Emulator
from iampg.proxy import Proxy
from support import endpoint_for

ProxyFactory = Callable[..., Proxy]

PROTOCOL_3_0 = 3 << 16
PROTOCOL_3_2 = (3 << 16) | 2
CANCEL_REQUEST = 80877102


def startup_packet(params: dict[str, str], version: int = PROTOCOL_3_0) -> bytes:
    """Return a StartupMessage with ``params``."""
    body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return struct.pack("!II", 8 + len(body), version) + body


def read_message(sock: socket.socket) -> tuple[bytes, bytes]:
    """Read one backend message; ``(b"", b"")`` at EOF."""
    header = _read(sock, 5)
    if len(header) < 5:
        return b"", b""
    (length,) = struct.unpack("!I", header[1:])
    return header[:1], _read(sock, length - 4)


def _read(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def raw_login(
    proxy: Proxy, params: dict[str, str], version: int = PROTOCOL_3_0
) -> tuple[socket.socket, list[tuple[bytes, bytes]]]:
    """Log in through ``proxy`` without TLS or password; return the socket and the messages.

    The messages are what came until ReadyForQuery (or an ErrorResponse, or EOF).
    """
    sock = socket.create_connection((proxy.host, proxy.port), timeout=10)
    try:
        sock.sendall(startup_packet(params, version))
        messages: list[tuple[bytes, bytes]] = []
        for _ in range(1000):
            kind, body = read_message(sock)
            messages.append((kind, body))
            if kind in (b"Z", b"E", b""):
                break
    except BaseException:
        sock.close()
        raise
    return sock, messages


def cancel_request(proxy: Proxy, key: bytes) -> bytes:
    """Send a CancelRequest with ``key`` (pid and secret) to the proxy; return what it said."""
    with socket.create_connection((proxy.host, proxy.port), timeout=10) as sock:
        sock.sendall(struct.pack("!II", 8 + len(key), CANCEL_REQUEST) + key)
        return _read(sock, 1)  # the proxy closes once it has handled it


def error_fields(body: bytes) -> dict[str, str]:
    """Return the fields of an ErrorResponse body."""
    return {item[:1].decode(): item[1:].decode() for item in body.split(b"\0") if item}


def query(sock: socket.socket, sql: str) -> list[tuple[bytes, bytes]]:
    """Run a simple query on a raw session; return the messages until ReadyForQuery."""
    sock.sendall(b"Q" + struct.pack("!I", len(sql) + 5) + sql.encode() + b"\0")
    messages = []
    for _ in range(10_000):
        kind, body = read_message(sock)
        messages.append((kind, body))
        if kind in (b"Z", b""):
            break
    return messages


def eventually(condition: Callable[[], bool], *, attempts: int = 1000) -> bool:
    """Poll ``condition`` every 10 ms, at most ``attempts`` times; return its last value."""
    import time

    for _ in range(attempts):
        if condition():
            return True
        time.sleep(0.01)
    return condition()


_UVLOOP = pytest.mark.skipif(not uvloop_installed(), reason="uvloop is not installed")


@pytest.fixture(params=["asyncio", pytest.param("uvloop", marks=_UVLOOP)])
def event_loop_kind(request: pytest.FixtureRequest) -> str:
    """The event loop a proxy started by :func:`start_proxy` runs on: each test runs on both."""
    kind: str = request.param
    return kind


@pytest.fixture
def start_proxy(event_loop_kind: str) -> Iterator[ProxyFactory]:
    """Return a factory of running proxies (``Proxy``'s arguments), stopped after the test."""
    with ExitStack() as running:

        def start(endpoint: Endpoint | str, **options: Any) -> Proxy:
            options.setdefault("grace", 0.0)
            options.setdefault("event_loop", event_loop_kind)
            return running.enter_context(Proxy(endpoint, **options))

        yield start


@pytest.fixture
def proxy(emulator: Emulator, start_proxy: ProxyFactory) -> Proxy:
    """Return a running proxy in front of the RDS-mode emulator, user postgres."""
    return start_proxy(endpoint_for(emulator))


@pytest.fixture
def emulator_endpoint(emulator: Emulator) -> Endpoint:
    """Return the endpoint of the RDS-mode emulator, user postgres."""
    return endpoint_for(emulator)


@pytest.fixture
def emulator_endpoint_proxy(
    emulator_endpoint: Endpoint, start_proxy: ProxyFactory, tmp_path: Path
) -> Proxy:
    """Return a running proxy that also listens on a Unix socket in a temporary directory."""
    return start_proxy(emulator_endpoint, unix_socket_dir=tmp_path)
