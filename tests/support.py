"""Helpers for tests that connect through the emulator."""

from __future__ import annotations

import contextlib
import gc
import os
import random
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from hypothesis import settings

import iampg
from iampg import Endpoint, SignedToken
from iampg._aws import AwsSigner
from iampg.emulator import Backend, CredentialsServer, Emulator

if TYPE_CHECKING:
    import sqlalchemy

# tests/conftest.py's start_emulator fixture: start_emulator(**options) -> a running Emulator.
EmulatorFactory = Callable[..., Emulator]


def endpoint_for(emu: Emulator, user: str = "postgres", **params: Any) -> Endpoint:
    """Return the endpoint a client uses for ``emu``: signed name, loopback address, full TLS.

    ``params`` override the fields; one given as None is left out (``sslrootcert=None``).
    """
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
    return Endpoint(emu.host, **{k: v for k, v in fields.items() if v is not None})


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


class ContendedCounter:
    """A one-row counter table, and a competing update committed from another connection.

    Transactions that read the counter at repeatable read and then write it fail with a real
    serialization failure (40001) when :meth:`bump_elsewhere` commits in between: the
    conflict DSQL reports as OC000.
    """

    def __init__(self, endpoint: Endpoint, table: str) -> None:
        self.endpoint = endpoint
        self.table = table
        with iampg.connect(endpoint, autocommit=True) as conn:
            conn.execute(f"drop table if exists {table}")
            conn.execute(f"create table {table} (id int primary key, n int not null)")
            conn.execute(f"insert into {table} values (1, 0)")

    def bump_elsewhere(self) -> None:
        """Add 100 to the counter in a transaction of its own, committed at once."""
        with iampg.connect(self.endpoint, autocommit=True) as other:
            other.execute(f"update {self.table} set n = n + 100 where id = 1")

    def value(self) -> int:
        """Return the counter's committed value."""
        with iampg.connect(self.endpoint) as conn:
            row = conn.execute(f"select n from {self.table} where id = 1").fetchone()
        assert row is not None
        return int(row[0])


@contextlib.contextmanager
def paused_serverless(backend: Backend, *, resume_delay: float) -> Iterator[Emulator]:
    """Yield a paused Aurora Serverless emulator that takes ``resume_delay`` s to resume."""
    with Emulator(
        backend.dsn, preset="aurora-express", resume_delay=resume_delay, connect_latency=0.0
    ) as emu:
        emu.pause()
        yield emu


class CutOnce:
    """SQLAlchemy work that, on its first call only, cuts every session without a word.

    The emulator closes every open session abruptly (no ErrorResponse, as an idle cut
    does) after the work's first statement; the work returns 9. ``calls`` counts the calls.
    """

    def __init__(self, emulator: Emulator) -> None:
        self.emulator = emulator
        self.calls = 0

    def __call__(self, conn: sqlalchemy.Connection) -> int:
        """Run one attempt: a statement, the cut on the first call, then ``select 9``."""
        from sqlalchemy import text

        self.calls += 1
        conn.execute(text("select 1"))
        if self.calls == 1:
            self.emulator.pause()
            self.emulator.resume()
        return int(conn.execute(text("select 9")).scalar_one())


def terminate_backend(endpoint: Endpoint, pid: int) -> None:
    """End backend ``pid`` from another session and wait until it is gone."""
    with iampg.connect(endpoint, autocommit=True) as admin:
        row = admin.execute("select pg_terminate_backend(%s, 5000)", (pid,)).fetchone()
    assert row == (True,)


def examples(full: int) -> int:
    """Return how many Hypothesis examples to run for a test that CI runs ``full`` times.

    All of them under the ``ci`` profile (100 examples by default, as Hypothesis's own), the
    same share of them as the loaded profile's ``max_examples`` otherwise, at least ten.
    """
    share = settings().max_examples / 100  # settings() holds the loaded profile's values
    return max(min(full, 10), round(full * share))


class RecordingSigner:
    """Signs real tokens through botocore and counts them."""

    def __init__(self) -> None:
        self.inner = AwsSigner()
        self.calls = 0

    def sign(self, endpoint: Endpoint, lifetime: float = 900.0) -> SignedToken:
        self.calls += 1
        return self.inner.sign(endpoint, lifetime)


class TamperingSigner(RecordingSigner):
    """Signs real tokens, then damages one part of the first ``times`` of them."""

    def __init__(self, damage: str, times: int = 1_000) -> None:
        super().__init__()
        self.damage = damage
        self.times = times

    def sign(self, endpoint: Endpoint, lifetime: float = 900.0) -> SignedToken:
        token = super().sign(endpoint, lifetime).token
        if self.calls > self.times:
            return SignedToken(token, 900.0)
        if self.damage == "signature":
            token = token[:-1] + ("0" if token[-1] != "0" else "1")
        elif self.damage == "user":
            token = token.replace("DBUser=postgres", "DBUser=someone")
        return SignedToken(token, 900.0)


# Startup packets, well formed and not, for the fuzzers of the emulator and the proxy.
SSL_REQUEST = struct.pack("!II", 8, 80877103)
GSS_REQUEST = struct.pack("!II", 8, 80877104)
CANCEL = struct.pack("!II", 16, 80877102)
PROTOCOL_3 = struct.pack("!I", 196608)


def startup_like(rng: random.Random) -> bytes:  # noqa: PLR0911 -- one return per shape
    """Return a malformed, truncated, oversized or garbage startup packet."""
    choice = rng.randrange(8)
    body = bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
    if choice == 0:  # garbage
        return body
    if choice == 1:  # length says more than comes (truncated)
        return struct.pack("!I", len(body) + 8 + rng.randrange(1, 1000)) + PROTOCOL_3 + body
    if choice == 2:  # oversized length
        return struct.pack("!I", rng.choice([10_001, 2**20, 2**31 - 1, 2**32 - 1])) + PROTOCOL_3
    if choice == 3:  # too short a length
        return struct.pack("!I", rng.randrange(8)) + body
    if choice == 4:  # unknown protocol version, well formed
        return struct.pack("!II", 8 + len(body), rng.randrange(2**32)) + body
    if choice == 5:  # parameters without terminators / odd pairs
        params = b"user\x00" + body.replace(b"\x00", b"") + b"\x00database"
        return struct.pack("!I", 8 + len(params)) + PROTOCOL_3 + params
    if choice == 6:  # SSLRequest or GSSENCRequest, then garbage instead of a handshake
        return rng.choice([SSL_REQUEST, GSS_REQUEST]) + body
    return CANCEL[: rng.randrange(1, len(CANCEL))]  # truncated cancel request


# JavaScript peers (node-postgres, the AWS SDK's signers): tests/node/package.json lists them and
# `nox -s tests` installs them with `npm ci`; a test skips with a reason where they are absent.
NODE_MODULES = Path(__file__).parent / "node" / "node_modules"


def node_with(*modules: str) -> tuple[str, dict[str, str]] | None:
    """Return ``node`` and an environment in which it resolves ``modules``, or None."""
    node = shutil.which("node")
    if node is None:
        return None
    env = dict(os.environ)
    if NODE_MODULES.is_dir():
        env["NODE_PATH"] = os.pathsep.join(filter(None, [str(NODE_MODULES), env.get("NODE_PATH")]))
    script = "".join(f"require({module!r});" for module in modules)
    probe = subprocess.run(
        [node, "-e", script], capture_output=True, timeout=30, check=False, env=env
    )
    return (node, env) if probe.returncode == 0 else None
