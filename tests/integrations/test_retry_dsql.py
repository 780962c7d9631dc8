"""retry_transaction through the DSQL-mode emulator, as admin, for each framework."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest
import sqlalchemy
from sqlalchemy import text

import iampg
from iampg import Endpoint, TokenProvider
from iampg.emulator import Backend, Emulator
from iampg.integrations import asyncpg as iampg_asyncpg
from iampg.integrations import psycopg2 as iampg_psycopg2
from iampg.integrations import sqlalchemy as iampg_sqlalchemy
from support import ContendedCounter, EmulatorFactory, endpoint_for

TABLE = "iampg_retry_dsql"


@pytest.fixture
def dsql(backend: Backend, start_emulator: EmulatorFactory) -> Emulator:
    """A DSQL-mode emulator; its admin role may create tables, as DSQL's admin can."""
    backend.ensure_role("admin", superuser=True)  # as the plugin makes it
    with psycopg.connect(backend.dsn, autocommit=True) as conn:
        conn.execute("grant create on schema public to admin")
        conn.execute(f"drop table if exists {TABLE}")
    return start_emulator(service="dsql")


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


# --- real conflicts from the emulator's optimistic concurrency, no isolation set ---

OC000 = "change conflicts with another transaction, please retry: (OC000)"


class RacedWriter:
    """An update that, on its first run, meets a concurrent writer of the same row.

    The concurrent transaction holds its uncommitted write until ours has conflicted (DSQL:
    the second writer loses), then commits; the run after that goes through.
    """

    def __init__(self, counter: ContendedCounter) -> None:
        self.counter = counter
        self.calls = 0
        self.other: psycopg.Connection[Any] | None = iampg.connect(counter.endpoint)
        self.other.execute(f"update {TABLE} set n = n + 100 where id = 1")

    def ran(self) -> int:
        self.calls += 1
        return self.calls

    def release(self) -> None:
        """Commit the concurrent write (after our first run conflicted)."""
        if self.other is not None and self.calls >= 1:
            self.other.commit()
            self.other.close()
            self.other = None

    def close(self) -> None:
        if self.other is not None:
            self.other.close()


def test_psycopg_pool_retries_a_concurrent_writers_conflict(counter: ContendedCounter) -> None:
    """No isolation asked for: the emulator's OCC makes the second writer lose with OC000."""
    raced = RacedWriter(counter)
    seen: list[str] = []

    def increment(conn: psycopg.Connection[Any]) -> int:
        if raced.ran() > 1:
            raced.release()
        conn.execute("set local statement_timeout = '10s'")  # without OCC it would wait
        try:
            conn.execute(f"update {TABLE} set n = n + 1 where id = 1")
        except psycopg.Error as exc:
            seen.append(f"{exc.sqlstate} {exc.diag.message_primary}")
            raise
        return raced.calls

    try:
        with iampg.ConnectionPool(counter.endpoint, min_size=1, max_size=1) as pool:
            assert iampg.retry_transaction(pool, increment, base=0.001) == 2
    finally:
        raced.close()
    assert seen == [f"40001 {OC000}"]
    assert counter.value() == 101


def test_asyncpg_retries_a_conflict_at_commit(dsql: Emulator, counter: ContendedCounter) -> None:
    """A forced conflict fails the commit itself, as DSQL reports it; the retry succeeds."""
    calls = [0]

    async def increment(conn: Any) -> int:
        calls[0] += 1
        await conn.execute(f"update {TABLE} set n = n + 1 where id = 1")
        return calls[0]

    async def main() -> int:
        async with iampg_asyncpg.create_pool(counter.endpoint, min_size=1, max_size=1) as pool:
            dsql.force_conflict()
            return await iampg_asyncpg.retry_transaction(pool, increment, base=0.001)

    assert asyncio.run(main()) == 2
    assert counter.value() == 1


def test_psycopg2_retries_a_conflict_at_commit(dsql: Emulator, counter: ContendedCounter) -> None:
    calls = [0]

    def increment(conn: Any) -> int:
        calls[0] += 1
        with conn.cursor() as cur:
            cur.execute(f"update {TABLE} set n = n + 1 where id = 1")
        return calls[0]

    pool = iampg_psycopg2.ThreadedConnectionPool(1, 1, counter.endpoint)
    try:
        dsql.force_conflict()
        assert iampg_psycopg2.retry_transaction(pool, increment, base=0.001) == 2
    finally:
        pool.closeall()
    assert counter.value() == 1


def test_sqlalchemy_retries_a_concurrent_writers_conflict(counter: ContendedCounter) -> None:
    engine = iampg_sqlalchemy.create_engine(TokenProvider(counter.endpoint))
    raced = RacedWriter(counter)

    def increment(conn: sqlalchemy.Connection) -> int:
        if raced.ran() > 1:
            raced.release()
        conn.execute(text("set local statement_timeout = '10s'"))  # without OCC it would wait
        conn.execute(text(f"update {TABLE} set n = n + 1 where id = 1"))
        return raced.calls

    try:
        assert iampg_sqlalchemy.retry_transaction(engine, increment, base=0.001) == 2
    finally:
        raced.close()
        engine.dispose()
    assert counter.value() == 101


def test_django_on_dsql_retries_a_conflict_at_commit(
    dsql: Emulator, counter: ContendedCounter, django_configured: None
) -> None:
    """Django through iampg.integrations.django.database() on DSQL, a conflict at COMMIT."""
    from django.db import connections
    from django.db import utils as db_utils

    from iampg.integrations.django import database
    from iampg.integrations.django import retry_transaction as django_retry

    alias = "iampg_dsql"
    wrapper = db_utils.ConnectionHandler({"default": database(TokenProvider(counter.endpoint))})[
        "default"
    ]
    connections[alias] = wrapper
    calls = [0]

    def increment() -> int:
        calls[0] += 1
        with connections[alias].cursor() as cur:
            cur.execute(f"update {TABLE} set n = n + 1 where id = 1")
        return calls[0]

    try:
        dsql.force_conflict()
        assert django_retry(increment, using=alias, base=0.001) == 2
    finally:
        wrapper.close()
        del connections[alias]
    assert counter.value() == 1
