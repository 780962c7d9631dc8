"""retry_transaction: conflicts and lost pooled connections run again; other errors do not."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

import iampg
from iampg.emulator import Emulator
from support import endpoint_for


@pytest.fixture
def counter(emulator: Emulator) -> str:
    """A fresh one-row table; returns its name."""
    with iampg.connect(endpoint_for(emulator), autocommit=True) as conn:
        conn.execute("drop table if exists iampg_retry_counter")
        conn.execute("create table iampg_retry_counter (id int primary key, n int not null)")
        conn.execute("insert into iampg_retry_counter values (1, 0)")
    return "iampg_retry_counter"


def test_serialization_failure_is_retried(emulator: Emulator, counter: str) -> None:
    """A 40001 caused by a concurrent update rolls back and runs again, once."""
    ep = endpoint_for(emulator)
    calls = 0
    with iampg.connect(ep) as conn, iampg.connect(ep, autocommit=True) as other:

        def work(c: psycopg.Connection[Any]) -> int:
            nonlocal calls
            calls += 1
            c.execute("set transaction isolation level repeatable read")
            row = c.execute(f"select n from {counter} where id = 1").fetchone()
            assert row is not None
            if calls == 1:  # someone else commits in between: our update must conflict
                other.execute(f"update {counter} set n = n + 100 where id = 1")
            c.execute(f"update {counter} set n = %s where id = 1", (row[0] + 1,))
            return int(row[0]) + 1

        assert iampg.retry_transaction(conn, work, base=0.001, cap=0.01) == 101
    assert calls == 2


@pytest.mark.parametrize("sqlstate", ["OC000", "OC001", "40001"])
def test_dsql_conflict_codes_are_retried_until_attempts_run_out(
    emulator: Emulator, sqlstate: str
) -> None:
    """DSQL's OC000/OC001 (raised here by PL/pgSQL) are retried; the last error surfaces."""
    calls = 0

    def conflict(c: psycopg.Connection[Any]) -> None:
        nonlocal calls
        calls += 1
        c.execute(f"do $$ begin raise exception 'conflict' using errcode = '{sqlstate}'; end $$")

    with iampg.connect(endpoint_for(emulator)) as conn:
        with pytest.raises(psycopg.Error) as info:
            iampg.retry_transaction(conn, conflict, attempts=3, base=0.001, cap=0.01)
        assert info.value.sqlstate == sqlstate
        assert conn.execute("select 1").fetchone() == (1,)  # usable: rolled back
    assert calls == 3


def test_other_errors_are_not_retried(emulator: Emulator) -> None:
    """A unique violation is not a conflict: it surfaces on the first attempt."""
    calls = 0

    def broken(c: psycopg.Connection[Any]) -> None:
        nonlocal calls
        calls += 1
        c.execute("select 1/0")

    with (
        iampg.connect(endpoint_for(emulator)) as conn,
        pytest.raises(psycopg.errors.DivisionByZero),
    ):
        iampg.retry_transaction(conn, broken, base=0.001)
    assert calls == 1


def test_async_retry_through_a_pool(emulator: Emulator) -> None:
    """The async twin retries with a fresh pooled connection per attempt."""
    calls = 0

    async def work(c: psycopg.AsyncConnection[Any]) -> int:
        nonlocal calls
        calls += 1
        if calls < 3:
            await c.execute("do $$ begin raise exception 'x' using errcode = 'OC000'; end $$")
        row = await (await c.execute("select 42")).fetchone()
        assert row is not None
        return int(row[0])

    async def main() -> int:
        async with iampg.AsyncConnectionPool(
            provider=iampg.TokenProvider(endpoint_for(emulator)),
            min_size=1,
            max_size=1,
            open=False,
        ) as pool:
            return await iampg.aretry_transaction(pool, work, base=0.001, cap=0.01)

    assert asyncio.run(main()) == 42
    assert calls == 3


def test_bad_retry_settings_are_refused(emulator: Emulator) -> None:
    """attempts below 1 or a cap below base are configuration errors."""
    with iampg.connect(endpoint_for(emulator)) as conn:
        with pytest.raises(iampg.ConfigurationError, match="attempts"):
            iampg.retry_transaction(conn, lambda c: None, attempts=0)
        with pytest.raises(iampg.ConfigurationError, match="base"):
            iampg.retry_transaction(conn, lambda c: None, base=1.0, cap=0.5)


def _terminate(ep: iampg.Endpoint, pid: int) -> None:
    """End backend ``pid`` from another session and wait until it is gone."""
    with iampg.connect(ep, autocommit=True) as admin:
        row = admin.execute("select pg_terminate_backend(%s, 5000)", (pid,)).fetchone()
    assert row == (True,)


def test_lost_pooled_connection_runs_again_on_another(emulator: Emulator) -> None:
    """A pooled connection that breaks before COMMIT is replaced and the work runs again."""
    ep = endpoint_for(emulator)
    pids: list[int] = []

    def work(c: psycopg.Connection[Any]) -> int:
        pids.append(c.info.backend_pid)
        if len(pids) == 1:
            _terminate(ep, c.info.backend_pid)  # the server goes away mid-transaction
        row = c.execute("select 7").fetchone()
        assert row is not None
        return int(row[0])

    with iampg.ConnectionPool(ep, min_size=1, max_size=1, open=True) as pool:
        assert iampg.retry_transaction(pool, work, base=0.001, cap=0.01) == 7
    assert len(pids) == 2
    assert pids[0] != pids[1]


@pytest.mark.parametrize("idempotent", [False, True])
def test_connection_lost_during_commit_runs_again_only_if_idempotent(
    emulator: Emulator, *, idempotent: bool
) -> None:
    """A break during COMMIT leaves the outcome unknown: raised unless the work is idempotent."""
    ep = endpoint_for(emulator)
    calls = 0

    def work(c: psycopg.Connection[Any]) -> None:
        nonlocal calls
        calls += 1
        c.execute("select 1")
        if calls == 1:  # gone before the COMMIT that ends this transaction is sent
            _terminate(ep, c.info.backend_pid)

    with iampg.ConnectionPool(ep, min_size=1, max_size=1, open=True) as pool:
        if idempotent:
            iampg.retry_transaction(pool, work, base=0.001, cap=0.01, idempotent=True)
            assert calls == 2
        else:
            with pytest.raises(psycopg.OperationalError):
                iampg.retry_transaction(pool, work, base=0.001, cap=0.01)
            assert calls == 1
        with pool.connection() as conn:  # the broken connection was not put back
            assert conn.execute("select 1").fetchone() == (1,)


def test_lost_own_connection_is_raised(emulator: Emulator) -> None:
    """A caller's own connection cannot be replaced: its loss surfaces at once."""
    ep = endpoint_for(emulator)
    calls = 0

    def work(c: psycopg.Connection[Any]) -> None:
        nonlocal calls
        calls += 1
        _terminate(ep, c.info.backend_pid)
        c.execute("select 1")

    with iampg.connect(ep) as conn, pytest.raises(psycopg.OperationalError):
        iampg.retry_transaction(conn, work, base=0.001)
    assert calls == 1


def test_async_lost_pooled_connection_runs_again(emulator: Emulator) -> None:
    """The async twin also replaces a connection that broke before COMMIT."""
    ep = endpoint_for(emulator)
    pids: list[int] = []

    async def work(c: psycopg.AsyncConnection[Any]) -> int:
        pids.append(c.info.backend_pid)
        if len(pids) == 1:
            await asyncio.to_thread(_terminate, ep, c.info.backend_pid)
        row = await (await c.execute("select 8")).fetchone()
        assert row is not None
        return int(row[0])

    async def main() -> int:
        async with iampg.AsyncConnectionPool(ep, min_size=1, max_size=1, open=False) as pool:
            return await iampg.aretry_transaction(pool, work, base=0.001, cap=0.01)

    assert asyncio.run(main()) == 8
    assert len(pids) == 2


def test_each_call_of_a_decorated_retry_has_attempts_of_its_own() -> None:
    """Calls of one decorated function (maybe at once, in threads) share no 'lost' flag."""
    import contextlib

    from iampg import _retry

    class Target:
        pass

    class Attempt(_retry.PoolOrConnection):
        def __init__(self, target: object) -> None:
            super().__init__(target, pool=Target, connection=(), expected="a Target")

        def transaction(self) -> contextlib.AbstractContextManager[Attempt]:
            return contextlib.nullcontext(self)

    seen: list[Attempt] = []

    def work(attempt: Attempt) -> None:
        seen.append(attempt)
        attempt.lost = True  # what a driver notes when this call's connection went away

    decorated = _retry.retrying(
        Attempt(Target()), None, attempts=2, base=0.01, cap=0.01, idempotent=False
    )(work)
    decorated()
    decorated()
    assert len(seen) == 2
    assert seen[0] is not seen[1]  # a fresh copy per call
