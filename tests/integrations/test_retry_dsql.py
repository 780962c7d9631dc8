"""retry_transaction through the DSQL-mode emulator, as admin, for each framework."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy
from sqlalchemy import text

from iampg import Endpoint, TokenProvider
from iampg.emulator import Backend, Emulator
from iampg.integrations import asyncpg as iampg_asyncpg
from iampg.integrations import psycopg2 as iampg_psycopg2
from iampg.integrations import sqlalchemy as iampg_sqlalchemy
from support import ContendedCounter, endpoint_for

TABLE = "iampg_retry_dsql"


@pytest.fixture
def dsql(backend: Backend) -> Iterator[Emulator]:
    """A DSQL-mode emulator; its admin role may create tables, as DSQL's admin can."""
    backend.ensure_role("admin")
    with psycopg.connect(backend.dsn, autocommit=True) as conn:
        conn.execute("grant create on schema public to admin")
        conn.execute(f"drop table if exists {TABLE}")
    with Emulator(backend.dsn, service="dsql") as emu:
        yield emu


@pytest.fixture
def counter(dsql: Emulator) -> ContendedCounter:
    """A fresh counter, made by admin through the emulator."""
    ep = endpoint_for(dsql, user="admin")
    assert ep.kind == "dsql"
    return ContendedCounter(ep, TABLE)


def _bump_once(counter: ContendedCounter) -> Any:
    """Return a callback that commits a competing update the first time only."""
    calls = [0]

    def bump() -> int:
        calls[0] += 1
        if calls[0] == 1:
            counter.bump_elsewhere()
        return calls[0]

    return bump


def test_sqlalchemy_on_dsql(counter: ContendedCounter) -> None:
    """A SQLAlchemy engine on DSQL runs a transaction again after a real conflict."""
    engine = iampg_sqlalchemy.create_engine(TokenProvider(counter.endpoint))
    bump = _bump_once(counter)

    def increment(conn: sqlalchemy.Connection) -> int:
        conn.execute(text("set transaction isolation level repeatable read"))
        n = int(conn.execute(text(f"select n from {TABLE} where id = 1")).scalar_one())
        bump()
        conn.execute(text(f"update {TABLE} set n = :n where id = 1"), {"n": n + 1})
        return n + 1

    try:
        assert iampg_sqlalchemy.retry_transaction(engine, increment, base=0.001) == 101
    finally:
        engine.dispose()
    assert counter.value() == 101


def test_asyncpg_pool_on_dsql(counter: ContendedCounter) -> None:
    """An asyncpg pool on DSQL runs a transaction again after a real conflict."""
    bump = _bump_once(counter)

    async def increment(conn: Any) -> int:
        await conn.execute("set transaction isolation level repeatable read")
        n: int = await conn.fetchval(f"select n from {TABLE} where id = 1")
        await asyncio.to_thread(bump)
        await conn.execute(f"update {TABLE} set n = $1 where id = 1", n + 1)
        return n + 1

    async def main() -> int:
        ep: Endpoint = counter.endpoint
        async with iampg_asyncpg.create_pool(ep, min_size=1, max_size=1) as pool:
            return await iampg_asyncpg.retry_transaction(pool, increment, base=0.001)

    assert asyncio.run(main()) == 101
    assert counter.value() == 101


def test_psycopg2_pool_on_dsql(counter: ContendedCounter) -> None:
    """A psycopg2 pool on DSQL runs a transaction again after a real conflict."""
    bump = _bump_once(counter)

    def increment(conn: Any) -> int:
        with conn.cursor() as cur:
            cur.execute("set transaction isolation level repeatable read")
            cur.execute(f"select n from {TABLE} where id = 1")
            n = int(cur.fetchone()[0])
            bump()
            cur.execute(f"update {TABLE} set n = %s where id = 1", (n + 1,))
        return n + 1

    pool = iampg_psycopg2.ThreadedConnectionPool(1, 1, counter.endpoint)
    try:
        assert iampg_psycopg2.retry_transaction(pool, increment, base=0.001) == 101
    finally:
        pool.closeall()
    assert counter.value() == 101
