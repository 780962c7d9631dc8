"""Helpers for tests that connect through the emulator."""

from __future__ import annotations

import gc
import socket
import time
from typing import Any

import psycopg
import pytest
from hypothesis import settings

from iampg import Endpoint
from iampg.emulator import Backend, CredentialsServer, Emulator


def endpoint_for(emu: Emulator, user: str = "postgres", **params: Any) -> Endpoint:
    """Return the endpoint a client uses for ``emu``: signed name, loopback address, full TLS."""
    fields: dict[str, Any] = {
        "user": user,
        "port": emu.port,
        "hostaddr": emu.listen_host,
        "region": emu.region,
        "sslmode": "verify-full",
        "sslrootcert": str(emu.ca_file),
        "connect_timeout": "5",
    }
    fields.update(params)
    return Endpoint(emu.host, **fields)


def use_credentials_server(monkeypatch: pytest.MonkeyPatch, server: CredentialsServer) -> None:
    """Point botocore's default chain at ``server`` instead of the static fake keys."""
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)


def open_sockets(port: int, *, side: str) -> list[socket.socket]:
    """Return this process's open TCP sockets whose ``side`` ("local" or "peer") uses ``port``.

    Found among live objects, so a socket left for the garbage collector to close shows up
    here before any ResourceWarning does.
    """
    found = []
    for obj in gc.get_objects():
        # type(), not isinstance(): lazy proxies (Django's settings) resolve on __class__
        if not issubclass(type(obj), socket.socket) or obj.fileno() == -1:
            continue
        try:
            address = obj.getsockname() if side == "local" else obj.getpeername()
        except OSError:  # not connected
            continue
        if isinstance(address, tuple) and address[1] == port:
            found.append(obj)
    return found


def sessions_of(backend: Backend, application_name: str) -> list[tuple[Any, ...]]:
    """Return the backend's sessions of ``application_name``: user, state, start, last query.

    Tests give their connections an application_name so that other clients of a shared
    server do not count.
    """
    with psycopg.connect(backend.dsn, connect_timeout=3) as conn:
        return conn.execute(
            "SELECT usename, state, backend_start, query FROM pg_stat_activity "
            "WHERE application_name = %s",
            (application_name,),
        ).fetchall()


def sessions_left(
    backend: Backend, application_name: str, *, within: float = 10.0
) -> list[tuple[Any, ...]]:
    """Give ended sessions ``within`` seconds to leave; return those of the name still there."""
    deadline = time.monotonic() + within
    left = sessions_of(backend, application_name)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = sessions_of(backend, application_name)
    return left


def examples(full: int) -> int:
    """Return how many Hypothesis examples to run for a test that CI runs ``full`` times.

    All of them under the ``ci`` profile (100 examples by default, as Hypothesis's own), the
    same share of them as the loaded profile's ``max_examples`` otherwise, at least ten.
    """
    share = settings().max_examples / 100  # settings() holds the loaded profile's values
    return max(min(full, 10), round(full * share))
