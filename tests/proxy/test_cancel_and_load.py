"""Cancel through the proxy, many sessions at once, and malformed packets."""

from __future__ import annotations

import asyncio
import random
import secrets
import socket
import threading
from collections.abc import Iterator

import psycopg
import pytest

from iampg.emulator import Backend, Emulator
from iampg.proxy import Proxy
from proxy_support import ProxyFactory, cancel_request, eventually
from support import endpoint_for, startup_like

# Keep botocore's DEBUG lines (which show signatures) out of failure reports.
pytestmark = pytest.mark.usefixtures("quiet_botocore")


def test_cancel_reaches_the_upstream_session(proxy: Proxy) -> None:
    """A client's cancel request cancels its query, through the proxy and over TLS upstream."""
    with psycopg.connect(proxy.conninfo) as conn:
        errors: list[BaseException] = []

        def run() -> None:
            try:
                conn.execute("select pg_sleep(60)")
            except BaseException as exc:
                errors.append(exc)

        worker = threading.Thread(target=run)
        worker.start()
        with psycopg.connect(proxy.conninfo, autocommit=True) as watcher:
            assert eventually(
                lambda: (
                    watcher.execute(
                        "select count(*) from pg_stat_activity where query = 'select pg_sleep(60)'"
                        " and state = 'active'"
                    ).fetchone()
                    == (1,)
                )
            )
        conn.cancel_safe()
        worker.join(timeout=30)
    assert len(errors) == 1
    assert isinstance(errors[0], psycopg.errors.QueryCanceled)
    assert proxy.stats().cancels_forwarded == 1


def test_a_guessed_cancel_key_cancels_nothing(proxy: Proxy, backend: Backend) -> None:
    """A cancel request with the real pid and a guessed secret is dropped, unsent."""
    with (
        psycopg.connect(proxy.conninfo, autocommit=True) as holder,
        psycopg.connect(proxy.conninfo) as waiter,
    ):
        holder.execute("select pg_advisory_lock(4242)")
        pid = waiter.info.backend_pid
        done: list[object] = []
        worker = threading.Thread(
            target=lambda: done.append(waiter.execute("select pg_advisory_lock(4242)").fetchone())
        )
        worker.start()
        with psycopg.connect(backend.dsn, autocommit=True) as admin:

            def waiting() -> bool:
                row = admin.execute(
                    "select wait_event_type from pg_stat_activity where pid = %s", (pid,)
                ).fetchone()
                return row == ("Lock",)

            assert eventually(waiting)
            for _ in range(3):
                key = pid.to_bytes(4, "big") + secrets.token_bytes(4)
                assert cancel_request(proxy, key) == b""
            assert waiting()  # still waiting: nothing was cancelled
        holder.execute("select pg_advisory_unlock(4242)")
        worker.join(timeout=30)
        assert len(done) == 1
    stats = proxy.stats()
    assert (stats.cancels_forwarded, stats.cancels_ignored) == (0, 3)


@pytest.fixture(scope="module")
def roomy_backend() -> Iterator[Backend]:
    """A throwaway PostgreSQL with room for 200 sessions (the shared one allows 100)."""
    with Backend.temporary() as backend:
        yield backend


@pytest.mark.slow
def test_many_concurrent_sessions(roomy_backend: Backend, start_proxy: ProxyFactory) -> None:
    """200 clients at once each get their own session; the proxy counts them all."""
    count = 200
    with Emulator(roomy_backend.dsn) as emu:
        proxy = start_proxy(endpoint_for(emu))

        async def one(i: int, barrier: asyncio.Event) -> int:
            conn = await psycopg.AsyncConnection.connect(proxy.conninfo)
            async with conn:
                await barrier.wait()
                cur = await conn.execute("select %s::int", (i,))
                row = await cur.fetchone()
                assert row is not None
                return int(row[0])

        async def run() -> list[int]:
            barrier = asyncio.Event()
            tasks = [asyncio.create_task(one(i, barrier)) for i in range(count)]
            for _ in range(3000):
                if proxy.sessions == count or any(t.done() for t in tasks):
                    break
                await asyncio.sleep(0.01)
            peak = proxy.sessions
            barrier.set()
            results = await asyncio.gather(*tasks)
            assert peak == count
            return results

        assert asyncio.run(run()) == list(range(count))
        assert eventually(lambda: proxy.stats().closed == count)
    stats = proxy.stats()
    assert (stats.opened, stats.failed) == (count, 0)


def _send(proxy: Proxy, payload: bytes, *, read: bool) -> bytes:
    with socket.create_connection((proxy.host, proxy.port), timeout=2) as sock:
        try:
            sock.sendall(payload)
        except OSError:
            return b""
        if not read:
            return b""
        try:
            sock.shutdown(socket.SHUT_WR)
            return sock.recv(4096)
        except OSError:
            return b""


@pytest.mark.parametrize("seed", range(3))
def test_malformed_client_packets_leave_the_proxy_serving(proxy: Proxy, seed: int) -> None:
    """After 50 malformed startup packets and early disconnects, clients still log in."""
    rng = random.Random(seed)
    for _ in range(50):
        answer = _send(proxy, startup_like(rng), read=rng.random() < 0.5)
        assert not answer or answer[:1] in {b"E", b"N"}
    with psycopg.connect(proxy.conninfo) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    assert proxy.stats().opened == 1
    assert eventually(lambda: proxy.sessions == 0)
