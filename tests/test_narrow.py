"""Narrowing the CA file: each server verified with the one CA its certificate chains to.

Against the real emulator: a CA file of several certificates, the emulator's among them, is
narrowed to the emulator's CA after trials, on every libpq path; a server that moves to
another CA of the file still connects within the same call; a server that chains to none
gets no token; concurrent connects make one trial. Pure rules (bounds, budget, fork) with
files only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

import iampg
from iampg import Endpoint, _narrow, _trust
from iampg.emulator import Emulator
from support import EmulatorFactory, endpoint_for
from test_default_tls import Mitm

STORE = _trust.directory()


def _certs(path: Path) -> list[bytes]:
    return [m.group(0) + b"\n" for m in _narrow._PEM.finditer(path.read_bytes())]


def _rds(index: int) -> bytes:
    """One of us-east-1's real RDS CAs: none of them signed the emulator's certificate."""
    return _certs(STORE / "rds-us-east-1.pem")[index]


def _bundle(path: Path, *certs: bytes) -> Path:
    path.write_bytes(b"".join(certs))
    return path


def _rootcert(conn: Any) -> str:
    """Return the sslrootcert a psycopg connection was opened with."""
    value: bytes = next(o.val for o in conn.pgconn.info if o.keyword == b"sslrootcert")
    return value.decode()


def _server(path: Path) -> _narrow._Server:
    (server,) = [s for k, s in _narrow._state.servers.items() if k[3] == str(path)]
    return server


@pytest.fixture(autouse=True)
def _fresh() -> None:
    _narrow.forget()


@pytest.fixture
def bundle(emulator: Emulator, tmp_path: Path) -> Path:
    """A 3-certificate file, like rds-<region>.pem: the emulator's CA second."""
    ca = emulator.ca_file.read_bytes()
    return _bundle(tmp_path / "region.pem", _rds(0), ca, _rds(1))


def test_connect_learns_the_emulators_ca_and_then_uses_it_alone(
    emulator: Emulator, bundle: Path
) -> None:
    """The first trial misses (whole file used), the second learns; later connects use it."""
    endpoint = endpoint_for(emulator, sslrootcert=str(bundle))
    used = []
    for _ in range(4):
        with iampg.connect(endpoint) as conn:
            used.append(_rootcert(conn))
            assert conn.execute("select 1").fetchone() == (1,)
    assert used[0] == str(bundle)  # the trial of the first CA missed: the whole file
    assert used[1] == used[2] == used[3] != str(bundle)
    assert Path(used[1]).read_bytes() == emulator.ca_file.read_bytes()
    assert _server(bundle).misses == 1


def test_the_environment_variables_file_is_narrowed(
    emulator: Emulator, bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file IAMPG_SSLROOTCERT names is iampg's choice for the endpoint: narrowed too."""
    monkeypatch.setenv(_trust.ENV_VAR, str(bundle))
    endpoint = endpoint_for(emulator)
    endpoint = Endpoint(
        endpoint.host,
        user=endpoint.user,
        port=endpoint.port,
        hostaddr=endpoint.hostaddr,
        region=endpoint.region,
    )
    for _ in range(2):
        iampg.connect(endpoint).close()
    with iampg.connect(endpoint) as conn:
        assert Path(_rootcert(conn)).read_bytes() == emulator.ca_file.read_bytes()


@pytest.mark.parametrize("path", ["aconnect", "pool", "async_pool"])
def test_psycopg_paths_learn_and_use_the_one_ca(
    emulator: Emulator, bundle: Path, path: str
) -> None:
    """aconnect and both pools narrow as connect does."""
    endpoint = endpoint_for(emulator, sslrootcert=str(bundle))

    async def async_connects() -> list[str]:
        used = []
        for _ in range(3):
            if path == "aconnect":
                conn = await iampg.aconnect(endpoint)
                used.append(_rootcert(conn))
                await conn.close()
            else:
                async with (
                    iampg.AsyncConnectionPool(endpoint, min_size=1, max_size=1) as pool,
                    pool.connection() as conn,
                ):
                    used.append(_rootcert(conn))
        return used

    if path == "pool":
        used = []
        for _ in range(3):
            with (
                iampg.ConnectionPool(endpoint, min_size=1, max_size=1) as pool,
                pool.connection() as conn,
            ):
                used.append(_rootcert(conn))
    else:
        used = asyncio.run(async_connects())
    assert used[0] == str(bundle)
    assert Path(used[2]).read_bytes() == emulator.ca_file.read_bytes()


def test_a_learned_file_removed_from_disk_is_written_again(
    emulator: Emulator, bundle: Path
) -> None:
    """A temporary-file cleaner deleting the learned file costs one retry, nothing learned."""
    endpoint = endpoint_for(emulator, sslrootcert=str(bundle))
    for _ in range(2):
        iampg.connect(endpoint).close()
    with iampg.connect(endpoint) as conn:
        learned = _rootcert(conn)
    Path(learned).unlink()
    with iampg.connect(endpoint) as conn:  # the missing file: the whole file, at once
        assert _rootcert(conn) == str(bundle)
    with iampg.connect(endpoint) as conn:  # written again; still the emulator's CA
        assert _rootcert(conn) == learned
    assert _server(bundle).misses == 1


def test_psycopg2_learns_and_uses_the_one_ca(emulator: Emulator, bundle: Path) -> None:
    """iampg's psycopg2 connect and pool narrow; psycopg2 cannot reconnect an object, so the
    whole-file retry is a new connection."""
    pytest.importorskip("psycopg2")
    from iampg.integrations import psycopg2 as iampg_psycopg2

    endpoint = endpoint_for(emulator, sslrootcert=str(bundle))
    used = []
    for _ in range(2):
        conn = iampg_psycopg2.connect(endpoint)
        used.append(conn.get_dsn_parameters()["sslrootcert"])
        conn.close()
    pool = iampg_psycopg2.ThreadedConnectionPool(1, 1, endpoint)
    conn = pool.getconn()
    used.append(conn.get_dsn_parameters()["sslrootcert"])
    pool.putconn(conn)
    pool.closeall()
    assert used[0] == str(bundle)
    assert used[1] == used[2] != str(bundle)
    assert Path(used[2]).read_bytes() == emulator.ca_file.read_bytes()


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_sqlalchemy_learns_and_uses_the_one_ca(
    emulator: Emulator, bundle: Path, driver: str
) -> None:
    """SQLAlchemy engines on libpq drivers narrow too."""
    pytest.importorskip(driver)
    from iampg.integrations import sqlalchemy as iampg_sqlalchemy

    endpoint = endpoint_for(emulator, sslrootcert=str(bundle))
    engine = iampg_sqlalchemy.create_engine(endpoint, driver=driver)
    used = []
    for _ in range(3):
        with engine.connect() as conn:
            raw: Any = conn.connection.driver_connection
            if driver == "psycopg":
                used.append(_rootcert(raw))
            else:
                used.append(raw.get_dsn_parameters()["sslrootcert"])
        engine.dispose()
    assert used[0] == str(bundle)
    assert Path(used[2]).read_bytes() == emulator.ca_file.read_bytes()


@pytest.mark.parametrize("pool", [False, True], ids=["unpooled", "native-pool"])
def test_django_learns_and_uses_the_one_ca(
    emulator: Emulator, bundle: Path, pool: bool, request: pytest.FixtureRequest
) -> None:
    """Django's backend narrows without a pool and with its native psycopg pool."""
    pytest.importorskip("django")
    request.getfixturevalue("django_configured")
    from django.db import utils as db_utils

    from iampg.integrations.django import database

    endpoint = endpoint_for(emulator, sslrootcert=str(bundle))
    entry = database(endpoint, pool={"min_size": 0, "max_size": 1} if pool else False)
    handler = db_utils.ConnectionHandler({"default": entry})
    conn = handler["default"]
    used = []
    try:
        for _ in range(3):
            conn.ensure_connection()
            used.append(_rootcert(conn.connection))
            conn.close()
            if pool:
                conn.pool.drain()
    finally:
        conn.close()
        conn.close_pool()
    assert used[0] == str(bundle)
    assert Path(used[2]).read_bytes() == emulator.ca_file.read_bytes()


# -- a server that moves to another CA of the file, or to none ---------------------------


class Relay:
    """A TCP relay on loopback whose destination can be switched between connections."""

    def __init__(self) -> None:
        self.target = ("127.0.0.1", 0)
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.1)
        self.port: int = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="relay", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except TimeoutError:
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._bridge, args=(client, upstream), daemon=True).start()

    @classmethod
    def _bridge(cls, client: socket.socket, upstream: socket.socket) -> None:
        with client, upstream:
            back = threading.Thread(target=cls._pipe, args=(upstream, client), daemon=True)
            back.start()
            cls._pipe(client, upstream)
            back.join(10.0)

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self._sock.close()


@pytest.fixture
def relay() -> Iterator[Relay]:
    """A relay; point it at a server with ``relay.target = port``."""
    server = Relay()
    try:
        yield server
    finally:
        server.close()


def _two_emulators(start: EmulatorFactory, relay: Relay) -> tuple[Emulator, Emulator]:
    """Two emulators for one name, each with its own CA, both taking tokens for the relay."""
    first = start(advertise_port=relay.port)
    second = start(advertise_port=relay.port)
    relay.target = ("127.0.0.1", first.port)
    return first, second


def test_a_server_moved_to_another_ca_of_the_file_connects_in_the_same_call(
    start_emulator: EmulatorFactory, relay: Relay, tmp_path: Path
) -> None:
    """The learned CA no longer verifies: forgotten, and the same call uses the whole file."""
    first, second = _two_emulators(start_emulator, relay)
    bundle = _bundle(
        tmp_path / "region.pem", first.ca_file.read_bytes(), second.ca_file.read_bytes()
    )
    endpoint = endpoint_for(first, port=relay.port, sslrootcert=str(bundle))
    with iampg.connect(endpoint) as conn:  # the first CA is tried first, and verifies
        assert Path(_rootcert(conn)).read_bytes() == first.ca_file.read_bytes()
    relay.target = ("127.0.0.1", second.port)  # now a certificate of the file's other CA
    with iampg.connect(endpoint) as conn:
        assert _rootcert(conn) == str(bundle)
        assert conn.execute("select 1").fetchone() == (1,)
    assert _server(bundle).learned is None
    with iampg.connect(endpoint) as conn:  # learning again: the first CA misses
        assert _rootcert(conn) == str(bundle)
    with iampg.connect(endpoint) as conn:  # then the second is learned
        assert Path(_rootcert(conn)).read_bytes() == second.ca_file.read_bytes()


def test_a_pool_survives_a_move_to_another_ca_of_the_file(
    start_emulator: EmulatorFactory, relay: Relay, tmp_path: Path
) -> None:
    """A pool's connection class retries with the whole file too: no failed attempt."""
    first, second = _two_emulators(start_emulator, relay)
    bundle = _bundle(
        tmp_path / "region.pem", first.ca_file.read_bytes(), second.ca_file.read_bytes()
    )
    endpoint = endpoint_for(first, port=relay.port, sslrootcert=str(bundle))
    with iampg.ConnectionPool(endpoint, min_size=0, max_size=1, timeout=5.0) as pool:
        with pool.connection() as conn:
            assert Path(_rootcert(conn)).read_bytes() == first.ca_file.read_bytes()
        pool.drain()
        relay.target = ("127.0.0.1", second.port)
        with pool.connection() as conn:
            assert _rootcert(conn) == str(bundle)
        assert pool.get_stats().get("connections_errors", 0) == 0


def test_a_server_that_chains_to_none_of_the_cas_gets_no_token(
    start_emulator: EmulatorFactory, relay: Relay, tmp_path: Path
) -> None:
    """Learned, then replaced by a machine in the middle: the explained error, no token sent."""
    first = start_emulator(advertise_port=relay.port)
    relay.target = ("127.0.0.1", first.port)
    bundle = _bundle(tmp_path / "region.pem", first.ca_file.read_bytes(), _rds(0), _rds(1))
    endpoint = endpoint_for(first, port=relay.port, sslrootcert=str(bundle))
    iampg.connect(endpoint).close()
    assert _server(bundle).learned == 0
    mitm = Mitm(tmp_path)
    try:
        relay.target = ("127.0.0.2", mitm.port)
        for _ in range(4):  # the learned CA, then trials of the others: none verifies
            with pytest.raises(psycopg.OperationalError, match="certificate verify failed") as info:
                iampg.connect(endpoint, wait=0)
            assert "did not verify" in str(info.value)
            assert str(bundle) in str(info.value)
        assert mitm.passwords == []
    finally:
        mitm.close()


# -- single flight ------------------------------------------------------------------------


def test_concurrent_connects_make_one_trial(emulator: Emulator, tmp_path: Path) -> None:
    """Eight threads connecting at once: one tries a single CA, the others use the whole file."""
    bundle = _bundle(tmp_path / "region.pem", _rds(0), emulator.ca_file.read_bytes())
    endpoint = endpoint_for(emulator, sslrootcert=str(bundle))
    provider = iampg.TokenProvider(endpoint)
    provider.token()
    start = threading.Barrier(8)
    errors: list[BaseException] = []

    def connect() -> None:
        try:
            start.wait(5.0)
            iampg.connect(endpoint, provider=provider).close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=connect) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30.0)
    assert errors == []
    assert _server(bundle).misses == 1  # one trial of the wrong CA, not eight
    with iampg.connect(endpoint, provider=provider) as conn:
        assert Path(_rootcert(conn)).read_bytes() == emulator.ca_file.read_bytes()


def test_concurrent_tasks_make_one_trial(emulator: Emulator, tmp_path: Path) -> None:
    """Eight aconnect tasks at once on one loop: one trial, the others use the whole file."""
    bundle = _bundle(tmp_path / "region.pem", _rds(0), emulator.ca_file.read_bytes())
    endpoint = endpoint_for(emulator, sslrootcert=str(bundle))
    provider = iampg.TokenProvider(endpoint)
    provider.token()

    async def connect() -> str:
        conn = await iampg.aconnect(endpoint, provider=provider)
        try:
            return _rootcert(conn)
        finally:
            await conn.close()

    async def burst() -> list[str]:
        return list(await asyncio.gather(*(connect() for _ in range(8))))

    assert asyncio.run(burst()) == [str(bundle)] * 8
    assert _server(bundle).misses == 1


def test_iampgs_own_files_narrow_to_the_shipped_one_ca_files(tmp_path: Path) -> None:
    """A shipped region file's trials are the store's one-CA files: nothing is written."""
    whole = STORE / "aws-us-east-1.pem"
    choice = _narrow.choose(_params(whole))
    assert choice is not None
    assert Path(choice.file).parent == STORE
    assert Path(choice.file).name == "ca-us-east-1-rsa2048.pem"
    choice.released()


# -- pure rules ---------------------------------------------------------------------------


def _params(path: Path, **extra: str) -> dict[str, str]:
    return {
        "host": "db.example",
        "port": "5432",
        "sslmode": "verify-full",
        "sslrootcert": str(path),
        **extra,
    }


def test_only_files_of_a_handful_of_certificates_are_narrowed(tmp_path: Path) -> None:
    """One certificate, more than five, system, require, or no file: left as it is."""
    assert _narrow.choose(_params(_bundle(tmp_path / "one.pem", _rds(0)))) is None
    big = _bundle(tmp_path / "big.pem", *_certs(STORE / "rds-global.pem")[:6])
    assert _narrow.choose(_params(big)) is None
    five = _bundle(tmp_path / "five.pem", *_certs(STORE / "rds-global.pem")[:5])
    assert _narrow.choose(_params(five)) is not None
    assert _narrow.choose({**_params(five), "sslrootcert": "system"}) is None
    assert _narrow.choose(_params(five, sslmode="require")) is None
    assert _narrow.choose(_params(tmp_path / "missing.pem")) is None


def test_each_piece_holds_one_certificate_of_the_file(tmp_path: Path) -> None:
    """Trials go in the file's order; each file tried is one of the file's certificates."""
    whole = _bundle(tmp_path / "three.pem", _rds(0), _rds(1), _rds(2))
    seen = []
    for _ in range(3):
        choice = _narrow.choose(_params(whole))
        assert choice is not None
        assert choice.trial
        seen.append(Path(choice.file).read_bytes())
        choice.refused()
    assert seen == [_rds(0), _rds(1), _rds(2)]
    assert _narrow.choose(_params(whole)) is None  # every one missed: the whole file


def test_a_trial_in_flight_leaves_other_connects_the_whole_file(tmp_path: Path) -> None:
    """While one connect tries a CA, others get None; once it verified, everyone uses it."""
    whole = _bundle(tmp_path / "two.pem", _rds(0), _rds(1))
    trial = _narrow.choose(_params(whole))
    assert trial is not None
    assert _narrow.choose(_params(whole)) is None
    trial.verified()
    again = _narrow.choose(_params(whole))
    assert again is not None
    assert not again.trial
    assert again.file == trial.file


def test_a_server_that_keeps_changing_ca_stops_being_narrowed(tmp_path: Path) -> None:
    """Misses are capped at twice the certificates: then the server keeps the whole file."""
    whole = _bundle(tmp_path / "two.pem", _rds(0), _rds(1))
    misses = 0
    for _ in range(20):
        choice = _narrow.choose(_params(whole))
        if choice is None:
            break
        choice.verified()
        choice = _narrow.choose(_params(whole))
        assert choice is not None
        choice.refused()  # a reader endpoint's next instance uses another CA
        misses += 1
    assert misses == 4
    assert _narrow.choose(_params(whole)) is None


def test_a_changed_file_starts_afresh(tmp_path: Path) -> None:
    """The file's size and time are part of what is learned: an edited file is split anew."""
    whole = _bundle(tmp_path / "two.pem", _rds(0), _rds(1))
    choice = _narrow.choose(_params(whole))
    assert choice is not None
    choice.verified()
    _bundle(whole, _rds(2), _rds(1), _rds(0))
    fresh = _narrow.choose(_params(whole))
    assert fresh is not None
    assert fresh.trial
    assert Path(fresh.file).read_bytes() == _rds(2)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_a_forked_child_keeps_what_was_learned_but_no_trial_in_flight(tmp_path: Path) -> None:
    """A trial in flight in the parent does not block the child; learned servers are kept."""
    learned = _bundle(tmp_path / "learned.pem", _rds(0), _rds(1))
    choice = _narrow.choose(_params(learned))
    assert choice is not None
    choice.verified()
    trying = _bundle(tmp_path / "trying.pem", _rds(1), _rds(2))
    assert _narrow.choose(_params(trying)) is not None  # left in flight across the fork
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running the parent's handlers
        status = b"?"
        try:
            kept = _narrow.choose(_params(learned))
            child = _narrow.choose(_params(trying))
            ok = kept is not None and not kept.trial and Path(kept.file).read_bytes() == _rds(0)
            status = b"ok" if ok and child is not None and child.trial else b"blocked"
        finally:
            os.write(write, status)
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        status = pipe.read()
    os.waitpid(pid, 0)
    assert status == b"ok"
