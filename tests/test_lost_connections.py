"""Pools whose idle connections all died at once (restart, failover) recover in one step."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import uuid
from typing import Any

import psycopg
import psycopg_pool
import pytest

import iampg
from iampg import Endpoint, _lost
from iampg.emulator import Backend, Emulator
from support import endpoint_for

POOL_SIZE = 4
APP = "iampg-lost-test"  # made unique per test by _own_application_name


@pytest.fixture(autouse=True)
def _own_application_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """Give each test's sessions a name of their own on the shared server.

    A previous test's sessions (or another run's, on a shared PostgreSQL) may still be ending
    on the server when the next test counts the sessions it terminates.
    """
    monkeypatch.setattr(sys.modules[__name__], "APP", f"iampg-lost-{uuid.uuid4().hex[:12]}")


class CountingCheck:
    """psycopg_pool's own check, counting how often it refused a connection."""

    def __init__(self) -> None:
        self.failures = 0

    def __call__(self, conn: psycopg.Connection[Any]) -> None:
        try:
            psycopg_pool.ConnectionPool.check_connection(conn)
        except psycopg.Error:
            self.failures += 1
            raise


class AsyncCountingCheck:
    """The asynchronous twin of :class:`CountingCheck`."""

    def __init__(self) -> None:
        self.failures = 0

    async def __call__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        try:
            await psycopg_pool.AsyncConnectionPool.check_connection(conn)
        except psycopg.Error:
            self.failures += 1
            raise


def test_one_failed_check_sweeps_every_dead_idle_connection(
    emulator: Emulator, backend: Backend
) -> None:
    """After all sessions die, checkout meets one dead connection, not four (0+1+2 s backoff)."""
    ep = endpoint_for(emulator)
    check = CountingCheck()
    with iampg.ConnectionPool(
        ep, min_size=POOL_SIZE, check=check, kwargs={"application_name": APP}, open=True
    ) as pool:
        pool.wait()
        assert backend.terminate_sessions(APP) == POOL_SIZE
        with pool.connection() as conn:
            assert conn.execute("select 1").fetchone() == (1,)
        assert check.failures == 1
        assert pool.get_stats()["connections_lost"] == POOL_SIZE  # 1 at checkout, 3 by the sweep


def test_async_one_failed_check_sweeps_every_dead_idle_connection(
    emulator: Emulator, backend: Backend
) -> None:
    """The async pool's check sweeps the dead idle connections too."""
    ep = endpoint_for(emulator)
    check = AsyncCountingCheck()

    async def main() -> dict[str, int]:
        async with iampg.AsyncConnectionPool(
            ep, min_size=POOL_SIZE, check=check, kwargs={"application_name": APP}
        ) as pool:
            await pool.wait()
            assert await asyncio.to_thread(backend.terminate_sessions, APP) == POOL_SIZE
            async with pool.connection() as conn:
                assert await (await conn.execute("select 1")).fetchone() == (1,)
            return pool.get_stats()

    stats = asyncio.run(main())
    assert check.failures == 1
    assert stats["connections_lost"] == POOL_SIZE


def _lost_retries(caplog: pytest.LogCaptureFixture) -> int:
    return sum(
        "connection lost" in r.getMessage() for r in caplog.records if r.name == "iampg.retry"
    )


def test_retry_transaction_sweeps_a_pool_without_check(
    emulator: Emulator, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    """A pool with no check: the first lost connection sweeps the rest; one retry, not four."""
    ep = endpoint_for(emulator)
    caplog.set_level(logging.DEBUG, logger="iampg.retry")
    with iampg.ConnectionPool(
        ep, min_size=POOL_SIZE, kwargs={"application_name": APP}, open=True
    ) as pool:
        pool.wait()
        assert backend.terminate_sessions(APP) == POOL_SIZE
        value = iampg.retry_transaction(
            pool, lambda c: c.execute("select 2").fetchone(), base=0.001, cap=0.01
        )
    assert value == (2,)
    assert _lost_retries(caplog) == 1


def test_async_retry_transaction_sweeps_a_pool_without_check(
    emulator: Emulator, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    """The async twin sweeps too."""
    ep = endpoint_for(emulator)
    caplog.set_level(logging.DEBUG, logger="iampg.retry")

    async def work(c: psycopg.AsyncConnection[Any]) -> object:
        return await (await c.execute("select 3")).fetchone()

    async def main() -> object:
        async with iampg.AsyncConnectionPool(
            ep, min_size=POOL_SIZE, kwargs={"application_name": APP}
        ) as pool:
            await pool.wait()
            assert await asyncio.to_thread(backend.terminate_sessions, APP) == POOL_SIZE
            return await iampg.aretry_transaction(pool, work, base=0.001, cap=0.01)

    assert asyncio.run(main()) == (3,)
    assert _lost_retries(caplog) == 1


def test_a_pool_already_being_swept_is_not_swept_again(
    emulator: Emulator, backend: Backend
) -> None:
    """While one caller sweeps a pool, another caller's sweep of it is skipped."""
    ep = endpoint_for(emulator)
    with iampg.ConnectionPool(ep, min_size=2, kwargs={"application_name": APP}, open=True) as pool:
        pool.wait()
        backend.terminate_sessions(APP)
        assert _lost._claim(pool)  # as if another thread were sweeping it now
        _lost.purge(pool)
        assert pool.get_stats().get("connections_lost", 0) == 0
        _lost._release(pool)
        _lost.purge(pool)
        assert pool.get_stats()["connections_lost"] == 2


def test_a_check_failing_on_a_live_connection_does_not_sweep(emulator: Emulator) -> None:
    """A custom check refusing a working connection is not a lost connection: no sweep."""
    ep = endpoint_for(emulator)
    refused: list[int] = []

    def picky(conn: psycopg.Connection[Any]) -> None:
        if not refused:
            refused.append(conn.info.backend_pid)
            raise psycopg.OperationalError("refused by the application's own check")

    with iampg.ConnectionPool(
        ep, min_size=2, check=picky, kwargs={"application_name": APP}, open=True
    ) as pool:
        pool.wait()
        with pool.connection() as conn:
            assert conn.info.backend_pid not in refused
        assert pool.get_stats().get("connections_lost", 0) == 0


class CountingConnection(psycopg.Connection[Any]):
    """A psycopg connection that counts the empty queries psycopg_pool's check sends."""

    checks = 0

    def execute(self, query: Any, *args: Any, **kwargs: Any) -> Any:
        if query == "":
            CountingConnection.checks += 1
        return super().execute(query, *args, **kwargs)


class FakeClock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _wait_readable(pool: psycopg_pool.ConnectionPool[Any]) -> None:
    """Wait (bounded) until the gateway has relayed the close to every idle connection."""
    for _ in range(500):
        if not any(_lost._quiet(conn) for conn in pool._pool):
            return
        time.sleep(0.01)
    pytest.fail("the closed sessions never became readable")


def test_liveness_check_skips_the_round_trip_only_for_recently_used_connections(
    emulator: Emulator,
) -> None:
    """Checkouts within a second of the last cost no query; one after a longer idle does."""
    clock = FakeClock()
    CountingConnection.checks = 0
    with iampg.ConnectionPool(
        endpoint_for(emulator),
        min_size=1,
        max_size=1,
        connection_class=CountingConnection,
        check=_lost.LivenessCheck(clock=clock),
        open=True,
    ) as pool:
        pool.wait()
        for _ in range(5):
            with pool.connection() as conn:
                conn.execute("select 1")
            clock.now += 0.5
        assert CountingConnection.checks == 1  # only the first checkout: new to the check
        clock.now += 1.0
        with pool.connection() as conn:
            conn.execute("select 1")
        assert CountingConnection.checks == 2  # idle for 1.5 s: checked with a query


def test_liveness_check_never_hands_out_a_session_the_server_just_closed(
    emulator: Emulator, backend: Backend
) -> None:
    """A session closed moments after its last use is seen (readable socket) and replaced."""
    clock = FakeClock()
    with iampg.ConnectionPool(
        endpoint_for(emulator),
        min_size=1,
        max_size=1,
        check=_lost.LivenessCheck(clock=clock),
        kwargs={"application_name": APP},
        open=True,
    ) as pool:
        pool.wait()
        with pool.connection() as conn:
            conn.execute("select 1")
        assert backend.terminate_sessions(APP) == 1
        _wait_readable(pool)
        with pool.connection() as conn:  # within the trusted second: no query, yet not handed
            assert conn.execute("select 1").fetchone() == (1,)
        assert pool.get_stats()["connections_lost"] == 1


def _wait_closed(pool: psycopg_pool.ConnectionPool[Any]) -> None:
    """Wait (bounded) until every idle connection's socket shows the server's end of stream."""
    for _ in range(500):
        if all(
            _lost._ready(conn) and _lost._ready(conn)[0][1] & _lost._GONE for conn in pool._pool
        ):
            return
        time.sleep(0.01)
    pytest.fail("the closed sessions never showed an end of stream")


def _restartable(emu: Emulator) -> Endpoint:
    """The endpoint of ``emu`` that still works once it is restarted (a new CA) on its port."""
    return endpoint_for(emu, sslmode="require", sslrootcert=None)


def test_liveness_check_refuses_a_closed_session_without_a_round_trip(backend: Backend) -> None:
    """A session whose socket shows the server's close is refused without trying a query.

    A gateway restart closes every client socket (an end of stream or a reset, as a server
    restart or DSQL's cap does): the check sees it on the socket, the pool replaces the
    connection, and psycopg_pool's empty query never goes out on the dead one.
    """
    clock = FakeClock()
    CountingConnection.checks = 0
    emu = Emulator(backend.dsn)
    emu.start()
    try:
        with iampg.ConnectionPool(
            _restartable(emu),
            min_size=1,
            max_size=1,
            connection_class=CountingConnection,
            check=_lost.LivenessCheck(clock=clock),
            open=True,
        ) as pool:
            pool.wait()
            with pool.connection() as conn:
                conn.execute("select 1")
            assert CountingConnection.checks == 1  # new to the check
            port = emu.port
            emu.stop()
            _wait_closed(pool)
            emu = Emulator(backend.dsn, port=port)
            emu.start()
            clock.now += 0.5
            with pool.connection() as conn:
                assert conn.execute("select 1").fetchone() == (1,)
            assert pool.get_stats()["connections_lost"] == 1
            # The replacement is new to the check (one query); the closed one cost none.
            assert CountingConnection.checks == 2
    finally:
        emu.stop()


class AsyncCountingConnection(psycopg.AsyncConnection[Any]):
    """The asynchronous twin of :class:`CountingConnection`."""

    checks = 0

    async def execute(self, query: Any, *args: Any, **kwargs: Any) -> Any:
        if query == "":
            AsyncCountingConnection.checks += 1
        return await super().execute(query, *args, **kwargs)


def test_async_liveness_check_refuses_a_closed_session_without_a_round_trip(
    backend: Backend,
) -> None:
    """The async twin refuses a closed session on what its socket shows, with no query."""
    clock = FakeClock()
    AsyncCountingConnection.checks = 0
    emu = Emulator(backend.dsn)
    emu.start()

    async def main() -> dict[str, int]:
        nonlocal emu
        async with iampg.AsyncConnectionPool(
            _restartable(emu),
            min_size=1,
            max_size=1,
            connection_class=AsyncCountingConnection,
            check=_lost.AsyncLivenessCheck(clock=clock),
        ) as pool:
            await pool.wait()
            async with pool.connection() as conn:
                await conn.execute("select 1")
            port = emu.port
            await asyncio.to_thread(emu.stop)
            for _ in range(500):
                if all((r := _lost._ready(c)) and r[0][1] & _lost._GONE for c in pool._pool):
                    break
                await asyncio.sleep(0.01)
            else:
                pytest.fail("the closed sessions never showed an end of stream")
            emu = Emulator(backend.dsn, port=port)
            await asyncio.to_thread(emu.start)
            clock.now += 0.5
            async with pool.connection() as conn:
                assert await (await conn.execute("select 1")).fetchone() == (1,)
            return pool.get_stats()

    try:
        stats = asyncio.run(main())
    finally:
        emu.stop()
    assert stats["connections_lost"] == 1
    assert AsyncCountingConnection.checks == 2  # each connection once, as new; none when closed


def _last_query(backend: Backend, application_name: str) -> str:
    """Return the last statement the server received in the session of ``application_name``."""
    with psycopg.connect(backend.dsn, autocommit=True) as admin:
        row = admin.execute(
            "SELECT query FROM pg_stat_activity WHERE application_name = %s",
            (application_name,),
        ).fetchone()
    assert row is not None
    return str(row[0])


def test_liveness_check_sends_nothing_for_a_recent_quiet_session(
    emulator: Emulator, backend: Backend
) -> None:
    """The server receives nothing from the check for a connection used a moment ago."""
    clock = FakeClock()
    marker = f"SELECT 'iampg-quiet-{uuid.uuid4().hex}'"
    with iampg.ConnectionPool(
        endpoint_for(emulator),
        min_size=1,
        max_size=1,
        check=_lost.LivenessCheck(clock=clock),
        kwargs={"application_name": APP, "autocommit": True},
        open=True,
    ) as pool:
        pool.wait()
        with pool.connection() as conn:
            conn.execute(marker)
        clock.now += 0.5
        with pool.connection():
            assert _last_query(backend, APP) == marker  # the checkout sent no query
        clock.now += 1.5
        with pool.connection():
            assert _last_query(backend, APP) == ""  # idle for 1.5 s: psycopg_pool's empty query


def test_async_liveness_check_never_hands_out_a_session_the_server_just_closed(
    emulator: Emulator, backend: Backend
) -> None:
    """The async twin sees a closed session without a round trip too."""
    clock = FakeClock()

    async def main() -> dict[str, int]:
        async with iampg.AsyncConnectionPool(
            endpoint_for(emulator),
            min_size=1,
            max_size=1,
            check=_lost.AsyncLivenessCheck(clock=clock),
            kwargs={"application_name": APP},
        ) as pool:
            await pool.wait()
            async with pool.connection() as conn:
                await conn.execute("select 1")
            assert await asyncio.to_thread(backend.terminate_sessions, APP) == 1
            for _ in range(500):
                if not any(_lost._quiet(c) for c in pool._pool):
                    break
                await asyncio.sleep(0.01)
            async with pool.connection() as conn:
                assert await (await conn.execute("select 1")).fetchone() == (1,)
            return pool.get_stats()

    assert asyncio.run(main())["connections_lost"] == 1


class CountingLiveness(_lost.LivenessCheck[Any]):
    """iampg's checkout check, counting the connections it refused for their age."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock=clock)
        self.expired = 0

    def __call__(self, conn: psycopg.Connection[Any]) -> None:
        try:
            super().__call__(conn)
        except _lost.Expired:
            self.expired += 1
            raise


def _past(seconds: float) -> None:
    """Let ``seconds`` of real time pass (max_lifetime runs on the real monotonic clock)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(left)


def test_liveness_check_recycles_idle_connections_past_max_lifetime(emulator: Emulator) -> None:
    """A connection idle past its lifetime is replaced at checkout, with its idle siblings.

    psycopg_pool enforces ``max_lifetime`` only when a connection is returned: without the
    check's own test, both connections below would be handed out again after their lifetime
    (DSQL closes at one hour, the pool's 3300 s exist to get there first). The fake clock keeps
    them "recently used", so no query is involved: only their age replaces them.
    """
    clock = FakeClock()
    check = CountingLiveness(clock)
    with iampg.ConnectionPool(
        endpoint_for(emulator),
        min_size=2,
        max_size=2,
        max_lifetime=1.0,
        check=check,
        kwargs={"application_name": APP},
        open=True,
    ) as pool:
        pool.wait()
        old = set()
        with pool.connection() as a, pool.connection() as b:
            old |= {a.info.backend_pid, b.info.backend_pid}
        check.expired = 0
        _past(1.1)
        with pool.connection() as a, pool.connection() as b:
            new = {a.info.backend_pid, b.info.backend_pid}
        assert not new & old
        assert check.expired == 1  # the first found; the sweep replaced the other at once
        assert pool.get_stats().get("connections_lost", 0) == 0


def test_async_liveness_check_recycles_idle_connections_past_max_lifetime(
    emulator: Emulator,
) -> None:
    """The async twin refuses a connection past its lifetime too."""
    clock = FakeClock()

    async def main() -> tuple[set[int], set[int]]:
        async with iampg.AsyncConnectionPool(
            endpoint_for(emulator),
            min_size=1,
            max_size=1,
            max_lifetime=1.0,
            check=_lost.AsyncLivenessCheck(clock=clock),
        ) as pool:
            await pool.wait()
            async with pool.connection() as conn:
                old = {conn.info.backend_pid}
            await asyncio.to_thread(_past, 1.1)
            async with pool.connection() as conn:
                new = {conn.info.backend_pid}
        return old, new

    old, new = asyncio.run(main())
    assert not new & old
