"""SQLAlchemy's retry_transaction: real conflicts and lost connections, sync and async."""

from __future__ import annotations

import asyncio
from typing import Any, TypedDict

import pytest
import sqlalchemy
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

import iampg
from iampg import Endpoint
from iampg.emulator import Emulator
from iampg.integrations import sqlalchemy as iampg_sqlalchemy
from support import ContendedCounter, CutOnce, endpoint_for, terminate_backend

TABLE = "iampg_retry_sa"


class Backoff(TypedDict):
    base: float
    cap: float


FAST: Backoff = {"base": 0.001, "cap": 0.01}


@pytest.fixture
def counter(emulator: Emulator) -> ContendedCounter:
    """A fresh one-row counter table behind the emulator."""
    return ContendedCounter(endpoint_for(emulator), TABLE)


@pytest.fixture
def ep(counter: ContendedCounter) -> Endpoint:
    """The emulator's endpoint."""
    return counter.endpoint


class Increment:
    """Read the counter and write it back plus one; the first run is raced by a commit."""

    def __init__(self, counter: ContendedCounter) -> None:
        self.counter = counter
        self.calls = 0

    def __call__(self, target: sqlalchemy.Connection | Session) -> int:
        self.calls += 1
        target.execute(text("set transaction isolation level repeatable read"))
        n = int(target.execute(text(f"select n from {TABLE} where id = 1")).scalar_one())
        if self.calls == 1:  # another transaction commits in between: ours must conflict
            self.counter.bump_elsewhere()
        target.execute(text(f"update {TABLE} set n = :n where id = 1"), {"n": n + 1})
        return n + 1


@pytest.mark.parametrize("kind", ["engine", "connection", "session", "sessionmaker"])
def test_serialization_failure_runs_again_on_every_bind(
    counter: ContendedCounter, ep: Endpoint, kind: str
) -> None:
    """A real 40001 inside SQLAlchemy's OperationalError is found and the work runs again."""
    engine = iampg_sqlalchemy.create_engine(ep)
    work = Increment(counter)
    try:
        if kind == "engine":
            result = iampg_sqlalchemy.retry_transaction(engine, work, **FAST)
        elif kind == "connection":
            with engine.connect() as conn:
                result = iampg_sqlalchemy.retry_transaction(conn, work, **FAST)
        elif kind == "session":
            with Session(engine) as session:
                result = iampg_sqlalchemy.retry_transaction(session, work, **FAST)
        else:
            result = iampg_sqlalchemy.retry_transaction(sessionmaker(engine), work, **FAST)
    finally:
        engine.dispose()
    assert result == 101
    assert work.calls == 2
    assert counter.value() == 101


def test_without_retry_the_conflict_surfaces(counter: ContendedCounter, ep: Endpoint) -> None:
    """Control: the same work in a plain engine.begin() fails with the serialization failure."""
    engine = iampg_sqlalchemy.create_engine(ep)
    try:
        with pytest.raises(sa_exc.OperationalError) as info, engine.begin() as conn:
            Increment(counter)(conn)
    finally:
        engine.dispose()
    assert getattr(info.value.orig, "sqlstate", None) == "40001"


def test_decorator_takes_the_session_as_first_argument(
    counter: ContendedCounter, ep: Endpoint
) -> None:
    """@retry_transaction(sessionmaker) runs the function with a session the caller omits."""
    engine = iampg_sqlalchemy.create_engine(ep)
    work = Increment(counter)

    @iampg_sqlalchemy.retry_transaction(sessionmaker(engine), **FAST)
    def increment_by(session: Session, extra: int) -> int:
        return work(session) + extra

    try:
        assert increment_by(1000) == 1101
        assert increment_by.__name__ == "increment_by"
    finally:
        engine.dispose()
    assert work.calls == 2


@pytest.mark.parametrize("sqlstate", ["OC000", "OC001"])
def test_dsql_codes_are_retried_until_attempts_run_out(ep: Endpoint, sqlstate: str) -> None:
    """DSQL's codes (raised here by PL/pgSQL) are retried; SQLAlchemy's error surfaces last."""
    engine = iampg_sqlalchemy.create_engine(ep)
    calls = 0

    def conflict(conn: sqlalchemy.Connection) -> None:
        nonlocal calls
        calls += 1
        conn.execute(text(f"do $$ begin raise exception 'x' using errcode = '{sqlstate}'; end $$"))

    try:
        with pytest.raises(sa_exc.DBAPIError) as info:
            iampg_sqlalchemy.retry_transaction(engine, conflict, attempts=3, **FAST)
    finally:
        engine.dispose()
    assert getattr(info.value.orig, "sqlstate", None) == sqlstate
    assert calls == 3


def test_other_errors_are_not_retried(ep: Endpoint) -> None:
    """A division by zero surfaces on the first attempt."""
    engine = iampg_sqlalchemy.create_engine(ep)
    calls = 0

    def broken(conn: sqlalchemy.Connection) -> None:
        nonlocal calls
        calls += 1
        conn.execute(text("select 1/0"))

    try:
        with pytest.raises(sa_exc.DataError):
            iampg_sqlalchemy.retry_transaction(engine, broken, **FAST)
    finally:
        engine.dispose()
    assert calls == 1


@pytest.mark.parametrize("kind", ["engine", "connection", "sessionmaker"])
def test_lost_connection_runs_again_on_a_new_one(ep: Endpoint, kind: str) -> None:
    """A connection cut before COMMIT is replaced and the work runs again."""
    engine = iampg_sqlalchemy.create_engine(ep, pool_size=1)
    pids: list[int] = []

    def work(target: sqlalchemy.Connection | Session) -> int:
        pid = int(target.execute(text("select pg_backend_pid()")).scalar_one())
        pids.append(pid)
        if len(pids) == 1:
            terminate_backend(ep, pid)  # the server goes away mid-transaction
        return int(target.execute(text("select 7")).scalar_one())

    try:
        if kind == "engine":
            result = iampg_sqlalchemy.retry_transaction(engine, work, **FAST)
        elif kind == "connection":
            with engine.connect() as conn:
                result = iampg_sqlalchemy.retry_transaction(conn, work, **FAST)
        else:
            result = iampg_sqlalchemy.retry_transaction(sessionmaker(engine), work, **FAST)
    finally:
        engine.dispose()
    assert result == 7
    assert len(pids) == 2
    assert pids[0] != pids[1]


def test_abrupt_cut_without_sqlstate_runs_again(emulator: Emulator, ep: Endpoint) -> None:
    """A session cut with no error message (as by an idle cut) is found through SQLAlchemy."""
    engine = iampg_sqlalchemy.create_engine(ep, pool_size=1)
    work = CutOnce(emulator)
    try:
        assert iampg_sqlalchemy.retry_transaction(engine, work, **FAST) == 9
    finally:
        engine.dispose()
    assert work.calls == 2


@pytest.mark.parametrize("idempotent", [False, True])
def test_lost_during_commit_runs_again_only_if_idempotent(ep: Endpoint, idempotent: bool) -> None:
    """A connection cut after the work, before COMMIT completes, is retried only if idempotent."""
    engine = iampg_sqlalchemy.create_engine(ep, pool_size=1)
    calls = 0

    def work(conn: sqlalchemy.Connection) -> None:
        nonlocal calls
        calls += 1
        pid = int(conn.execute(text("select pg_backend_pid()")).scalar_one())
        if calls == 1:  # gone before the COMMIT that ends this transaction is sent
            terminate_backend(ep, pid)

    try:
        if idempotent:
            iampg_sqlalchemy.retry_transaction(engine, work, idempotent=True, **FAST)
            assert calls == 2
        else:
            with pytest.raises(sa_exc.OperationalError):
                iampg_sqlalchemy.retry_transaction(engine, work, **FAST)
            assert calls == 1
    finally:
        engine.dispose()


def test_unknown_binds_and_bad_settings_are_refused(ep: Endpoint) -> None:
    """A bind SQLAlchemy does not know and bad retry settings are configuration errors."""
    engine = iampg_sqlalchemy.create_engine(ep)
    try:
        with pytest.raises(iampg.ConfigurationError, match="Engine, Connection"):
            iampg_sqlalchemy.retry_transaction("engine", lambda c: None)  # type: ignore[call-overload]
        with pytest.raises(iampg.ConfigurationError, match="attempts"):
            iampg_sqlalchemy.retry_transaction(engine, attempts=0)
        with pytest.raises(iampg.ConfigurationError, match="AsyncEngine"):
            iampg_sqlalchemy.aretry_transaction(engine, lambda c: asyncio.sleep(0))  # type: ignore[call-overload]
    finally:
        engine.dispose()


@pytest.mark.parametrize("kind", ["engine", "connection", "session", "sessionmaker", "decorator"])
def test_async_conflict_runs_again(counter: ContendedCounter, ep: Endpoint, kind: str) -> None:
    """The async twin finds 40001 inside SQLAlchemy's error on every async bind."""
    calls = 0

    async def work(target: AsyncConnection | AsyncSession) -> int:
        nonlocal calls
        calls += 1
        await target.execute(text("set transaction isolation level repeatable read"))
        n = int((await target.execute(text(f"select n from {TABLE} where id = 1"))).scalar_one())
        if calls == 1:
            await asyncio.to_thread(counter.bump_elsewhere)
        await target.execute(text(f"update {TABLE} set n = :n where id = 1"), {"n": n + 1})
        return n + 1

    async def main() -> int:
        engine = iampg_sqlalchemy.create_async_engine(ep)
        try:
            if kind == "engine":
                return await iampg_sqlalchemy.aretry_transaction(engine, work, **FAST)
            if kind == "connection":
                async with engine.connect() as conn:
                    return await iampg_sqlalchemy.aretry_transaction(conn, work, **FAST)
            if kind == "session":
                async with AsyncSession(engine) as session:
                    return await iampg_sqlalchemy.aretry_transaction(session, work, **FAST)
            maker = async_sessionmaker(engine)
            if kind == "sessionmaker":
                return await iampg_sqlalchemy.aretry_transaction(maker, work, **FAST)

            @iampg_sqlalchemy.aretry_transaction(maker, **FAST)
            async def decorated(session: AsyncSession, extra: int) -> int:
                return await work(session) + extra

            return await decorated(0)
        finally:
            await engine.dispose()

    assert asyncio.run(main()) == 101
    assert calls == 2
    assert counter.value() == 101


def test_async_lost_connection_runs_again(ep: Endpoint) -> None:
    """The async twin replaces a connection cut before COMMIT."""
    pids: list[int] = []

    async def work(conn: AsyncConnection) -> int:
        pid = int((await conn.execute(text("select pg_backend_pid()"))).scalar_one())
        pids.append(pid)
        if len(pids) == 1:
            await asyncio.to_thread(terminate_backend, ep, pid)
        return int((await conn.execute(text("select 8"))).scalar_one())

    async def main() -> int:
        engine = iampg_sqlalchemy.create_async_engine(ep, pool_size=1)
        try:
            return await iampg_sqlalchemy.aretry_transaction(engine, work, **FAST)
        finally:
            await engine.dispose()

    assert asyncio.run(main()) == 8
    assert len(pids) == 2
    assert pids[0] != pids[1]


def _typed(engine: sqlalchemy.Engine) -> Any:
    """Pin the decorator's types: the session argument is dropped from the signature."""

    @iampg_sqlalchemy.retry_transaction(engine)
    def name(conn: sqlalchemy.Connection, suffix: str) -> str:
        return str(conn.execute(text("select current_user")).scalar_one()) + suffix

    result: str = name("!")
    return result
