"""Helpers for tests that connect through the emulator."""

from __future__ import annotations

import gc
import socket
from typing import Any

import pytest

from iampg import Endpoint
from iampg.emulator import CredentialsServer, Emulator


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
