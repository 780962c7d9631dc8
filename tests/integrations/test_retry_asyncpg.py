"""asyncpg's retry_transaction: real conflicts and lost connections, on pools and connections."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import pytest

import iampg
from iampg import Endpoint
from iampg.emulator import Emulator
from iampg.integrations import asyncpg as iampg_asyncpg
from support import ContendedCounter, endpoint_for, open_sockets, terminate_backend

TABLE = "iampg_retry_asyncpg"
T = TypeVar("T")


@pytest.fixture
def counter(emulator: Emulator) -> ContendedCounter:
    """A fresh one-row counter table behind the emulator."""
    return ContendedCounter(endpoint_for(emulator), TABLE)


def _run(emulator: Emulator, main: Callable[[], Awaitable[T]]) -> T:
    """Run ``main`` on a new loop, then let every socket to the emulator finish closing."""

    async def wrapped() -> T:
        try:
            return await main()
        finally:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5
            while open_sockets(emulator.port, side="peer"):
                assert loop.time() < deadline, "a connection to the emulator did not close"
                await asyncio.sleep(0.01)

    return asyncio.run(wrapped())


class Increment:
    """Read the counter and write it back plus one; the first run is raced by a commit."""

    def __init__(self, counter: ContendedCounter) -> None:
        self.counter = counter
        self.calls = 0

    async def __call__(self, conn: Any) -> int:
        self.calls += 1
        await conn.execute("set transaction isolation level repeatable read")
        n: int = await conn.fetchval(f"select n from {TABLE} where id = 1")
        if self.calls == 1:  # another transaction commits in between: ours must conflict
            await asyncio.to_thread(self.counter.bump_elsewhere)
        await conn.execute(f"update {TABLE} set n = $1 where id = 1", n + 1)
        return n + 1


@pytest.mark.parametrize("kind", ["pool", "connection", "acquired", "decorator"])
def test_serialization_failure_runs_again(
    emulator: Emulator, counter: ContendedCounter, kind: str
) -> None:
    """asyncpg's real SerializationError is retried on a pool, a connection, a decorator."""
    provider = iampg.TokenProvider(counter.endpoint)
    work = Increment(counter)

    async def main() -> int:
        async with iampg_asyncpg.create_pool(provider, min_size=1, max_size=2) as pool:
            if kind == "pool":
                return await iampg_asyncpg.retry_transaction(pool, work, base=0.001, cap=0.01)
            if kind == "acquired":
                async with pool.acquire() as conn:
                    return await iampg_asyncpg.retry_transaction(conn, work, base=0.001)
            if kind == "decorator":

                @iampg_asyncpg.retry_transaction(pool, base=0.001, cap=0.01)
                async def increment_by(conn: Any, extra: int) -> int:
                    return await work(conn) + extra

                return await increment_by(0)
        conn = await iampg_asyncpg.connect(provider)
        try:
            return await iampg_asyncpg.retry_transaction(conn, work, base=0.001, cap=0.01)
        finally:
            await conn.close()

    assert _run(emulator, main) == 101
    assert work.calls == 2
    assert counter.value() == 101


def test_without_retry_the_conflict_surfaces(emulator: Emulator, counter: ContendedCounter) -> None:
    """Control: the same work in a plain transaction fails with asyncpg's SerializationError."""

    async def main() -> None:
        conn = await iampg_asyncpg.connect(counter.endpoint)
        try:
            async with conn.transaction():
                await Increment(counter)(conn)
        finally:
            await conn.close()

    with pytest.raises(asyncpg.SerializationError):
        _run(emulator, main)


@pytest.mark.parametrize("sqlstate", ["OC000", "OC001"])
def test_dsql_codes_are_retried_until_attempts_run_out(emulator: Emulator, sqlstate: str) -> None:
    """DSQL's codes (raised here by PL/pgSQL) are retried; the last error surfaces."""
    calls = 0

    async def conflict(conn: Any) -> None:
        nonlocal calls
        calls += 1
        await conn.execute(f"do $$ begin raise exception 'x' using errcode = '{sqlstate}'; end $$")

    async def main() -> None:
        async with iampg_asyncpg.create_pool(endpoint_for(emulator), min_size=1) as pool:
            await iampg_asyncpg.retry_transaction(pool, conflict, attempts=3, base=0.001)

    with pytest.raises(asyncpg.PostgresError) as info:
        _run(emulator, main)
    assert getattr(info.value, "sqlstate", None) == sqlstate
    assert calls == 3


@pytest.mark.parametrize("cut", ["terminated", "abrupt"])
def test_pool_replaces_a_connection_lost_before_commit(emulator: Emulator, cut: str) -> None:
    """A pooled connection terminated (57P01) or cut without a word is replaced; fn reruns."""
    ep = endpoint_for(emulator)
    pids: list[int] = []

    async def work(conn: Any) -> int:
        pid: int = await conn.fetchval("select pg_backend_pid()")
        pids.append(pid)
        if len(pids) == 1:
            if cut == "terminated":
                await asyncio.to_thread(terminate_backend, ep, pid)
            else:
                await asyncio.to_thread(emulator.pause)
                await asyncio.to_thread(emulator.resume)
        value: int = await conn.fetchval("select 7")
        return value

    async def main() -> int:
        async with iampg_asyncpg.create_pool(ep, min_size=1, max_size=1) as pool:
            return await iampg_asyncpg.retry_transaction(pool, work, base=0.001, cap=0.01)

    assert _run(emulator, main) == 7
    assert len(pids) == 2
    assert pids[0] != pids[1]


def test_own_connection_lost_is_raised(emulator: Emulator) -> None:
    """A caller's own connection cannot be replaced: its loss surfaces on the first attempt."""
    ep = endpoint_for(emulator)
    calls = 0

    async def work(conn: Any) -> None:
        nonlocal calls
        calls += 1
        pid: int = await conn.fetchval("select pg_backend_pid()")
        await asyncio.to_thread(terminate_backend, ep, pid)
        await conn.fetchval("select 1")

    async def main() -> None:
        conn = await iampg_asyncpg.connect(ep)
        try:
            await iampg_asyncpg.retry_transaction(conn, work, base=0.001)
        finally:
            await conn.close()

    with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError)):
        _run(emulator, main)
    assert calls == 1


def test_unknown_target_is_refused(emulator: Emulator) -> None:
    """Something that is neither an asyncpg pool nor a connection is a configuration error."""
    ep: Endpoint = endpoint_for(emulator)
    with pytest.raises(iampg.ConfigurationError, match="asyncpg Pool or Connection"):
        iampg_asyncpg.retry_transaction(ep, lambda conn: asyncio.sleep(0))
