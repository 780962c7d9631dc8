"""Service presets in every integration: no query fails while DSQL's cap closes sessions.

Two DSQL emulators stand for the one-hour cap. For the checks at checkout, the emulator's clock
jumps an hour between rounds, while the application's connections sit in its pool: the cap
closes every idle session, and the next round must not meet one. For the maximum connection
age, the cap is shortened to two seconds of real time and each round holds its connection
between two statements: only a connection replaced before the cap (the preset's 3300 s of 3600,
scaled) never meets it. Each test runs across several caps and counts failed queries: none.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text

from iampg import TokenProvider
from iampg._defaults import PROFILES
from iampg.emulator import Backend, Emulator
from iampg.integrations import asyncpg as iampg_asyncpg
from iampg.integrations import sqlalchemy as iampg_sqlalchemy
from support import EmulatorFactory, endpoint_for

HOUR = 3600.0  # DSQL's cap, in the emulator's seconds
JUMPS = 3  # caps met by the checkout tests
CAP = 2.0  # seconds of real time: the shortened cap of the lifetime tests
ROUNDS = 16  # rounds of the lifetime tests, each HOLD plus PAUSE or more: over two caps
PAUSE = 0.1
HOLD = 0.25  # seconds a connection is held between two statements
# DSQL's 3300 s recycle for a 3600 s cap leaves 300 s; scaled to CAP, with room for HOLD and a
# loaded machine's delays.
LIFETIME = CAP - HOLD - 1.0
WAIT = 10.0  # seconds to wait for the emulator to close the sessions after a jump


@pytest.fixture
def dsql(backend: Backend, start_emulator: EmulatorFactory) -> Emulator:
    """A DSQL emulator whose sessions are capped at CAP seconds of real time."""
    backend.ensure_role("admin", superuser=True)  # as the plugin makes it
    return start_emulator(service="dsql", session_cap=CAP, transaction_limit=0.1)


@pytest.fixture
def provider(dsql: Emulator) -> TokenProvider:
    ep = endpoint_for(dsql, user="admin")
    assert ep.kind == "dsql"
    return TokenProvider(ep)


@pytest.fixture
def hourly(backend: Backend, start_emulator: EmulatorFactory) -> Emulator:
    """A DSQL emulator with the real one-hour cap, whose clock the test moves."""
    backend.ensure_role("admin", superuser=True)  # as the plugin makes it
    return start_emulator(service="dsql")


@pytest.fixture
def hourly_provider(hourly: Emulator) -> TokenProvider:
    """A provider on the emulator's clock: after a jump it signs a token valid there."""
    return TokenProvider(endpoint_for(hourly, user="admin"), clock=hourly.clock.monotonic)


def capped(emu: Emulator) -> int:
    """How many sessions the emulator has closed at the cap."""
    return sum(1 for e in emu.events if (e.outcome, e.reason) == ("closed", "session cap"))


def jump_an_hour(emu: Emulator) -> None:
    """Move the emulator's clock past the cap; wait until it closed the open sessions."""
    before = capped(emu)
    emu.clock.advance(HOUR)
    deadline = time.monotonic() + WAIT
    while capped(emu) == before:
        assert time.monotonic() < deadline, "the emulator closed no session at the cap"
        time.sleep(0.01)


async def ajump_an_hour(emu: Emulator) -> None:
    """:func:`jump_an_hour` without blocking the loop, which must read the server's close."""
    before = capped(emu)
    emu.clock.advance(HOUR)
    deadline = time.monotonic() + WAIT
    while capped(emu) == before:
        assert time.monotonic() < deadline, "the emulator closed no session at the cap"
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)  # let the loop read the close the emulator sent


# -- SQLAlchemy -----------------------------------------------------------------------------


@pytest.mark.slow  # waits out session caps in real time (the emulator's clock steps)
def test_sqlalchemy_dsql_engine_checks_connections_at_checkout(
    hourly: Emulator, hourly_provider: TokenProvider
) -> None:
    """The DSQL preset's pre-ping replaces a connection the cap closed in the pool."""
    engine = iampg_sqlalchemy.create_engine(hourly_provider, pool_size=1)
    try:
        pids = set()
        for _ in range(JUMPS + 1):
            with engine.connect() as conn:
                pids.add(conn.execute(text("select pg_backend_pid()")).scalar_one())
            jump_an_hour(hourly)
    finally:
        engine.dispose()
    assert len(pids) == JUMPS + 1  # each capped session was replaced unseen


@pytest.mark.slow  # waits out session caps in real time (the emulator's clock steps)
def test_sqlalchemy_dsql_engine_recycles_under_the_cap(provider: TokenProvider) -> None:
    """Connections are replaced before the cap: a transaction never runs into it."""
    engine = iampg_sqlalchemy.create_engine(provider, pool_size=1, pool_recycle=LIFETIME)
    try:
        for _ in range(ROUNDS):
            with engine.begin() as conn:
                conn.execute(text("select 1"))
                time.sleep(HOLD)
                conn.execute(text("select 1"))
    finally:
        engine.dispose()


@pytest.mark.slow  # waits out session caps in real time (the emulator's clock steps)
def test_sqlalchemy_dsql_async_engine_on_asyncpg(provider: TokenProvider) -> None:
    """The asyncpg engine gets the same checks: no query fails across caps."""

    async def main() -> set[int]:
        engine = iampg_sqlalchemy.create_async_engine(
            provider, driver="asyncpg", pool_size=1, pool_recycle=LIFETIME
        )
        pids = set()
        try:
            for _ in range(ROUNDS):
                async with engine.begin() as conn:
                    pids.add((await conn.execute(text("select pg_backend_pid()"))).scalar_one())
                    await asyncio.sleep(HOLD)
                    await conn.execute(text("select 1"))
                await asyncio.sleep(PAUSE)
        finally:
            await engine.dispose()
        return pids

    assert len(asyncio.run(main())) >= 3


def test_sqlalchemy_presets_set_the_pool() -> None:
    """DSQL: recycle at 3300 s and pre-ping; Aurora Serverless: 60 s pool timeout; caller wins."""
    dsql = PROFILES["dsql"]
    options, checks = iampg_sqlalchemy._pool_options(dsql, {}, None)
    assert options == {"pool_recycle": 3300.0, "pool_pre_ping": True}
    assert (checks.lifetime, checks.max_idle) == (3300.0, None)
    options, checks = iampg_sqlalchemy._pool_options(dsql, {"pool_recycle": -1}, None)
    assert checks.lifetime is None
    aurora = PROFILES["aurora-serverless"]
    options, checks = iampg_sqlalchemy._pool_options(aurora, {}, None)
    assert options == {"pool_timeout": 60.0}
    assert (checks.lifetime, checks.max_idle) == (None, 240.0)
    assert iampg_sqlalchemy._pool_options(aurora, {}, 0)[1].max_idle is None


def test_sqlalchemy_max_idle_replaces_an_idle_connection(emulator: Emulator) -> None:
    """A connection idle past ``max_idle`` is replaced at checkout, one in use is kept."""
    engine = iampg_sqlalchemy.create_engine(
        TokenProvider(endpoint_for(emulator)), pool_size=1, max_idle=0.3
    )
    try:
        with engine.connect() as conn:
            first = conn.execute(text("select pg_backend_pid()")).scalar_one()
        with engine.connect() as conn:
            again = conn.execute(text("select pg_backend_pid()")).scalar_one()
        time.sleep(0.5)
        with engine.connect() as conn:
            later = conn.execute(text("select pg_backend_pid()")).scalar_one()
    finally:
        engine.dispose()
    assert first == again != later


# -- asyncpg --------------------------------------------------------------------------------


@pytest.mark.slow  # waits out session caps in real time (the emulator's clock steps)
def test_asyncpg_dsql_pool_replaces_connections_under_the_cap(provider: TokenProvider) -> None:
    """A connection past ``max_lifetime`` is closed and replaced: no statement meets the cap."""

    async def main() -> set[int]:
        pids = set()
        async with iampg_asyncpg.create_pool(
            provider, min_size=1, max_size=1, max_lifetime=LIFETIME
        ) as pool:
            for _ in range(ROUNDS):
                async with pool.acquire() as conn:
                    pids.add(await conn.fetchval("select pg_backend_pid()"))
                    await asyncio.sleep(HOLD)
                    await conn.fetchval("select 1")
                await asyncio.sleep(PAUSE)
        return pids

    assert len(asyncio.run(main())) >= 3


@pytest.mark.slow  # waits out session caps in real time (the emulator's clock steps)
def test_asyncpg_dsql_pool_survives_the_cap_while_idle(
    hourly: Emulator, hourly_provider: TokenProvider
) -> None:
    """asyncpg itself replaces a connection the cap closed while it sat in the pool."""

    async def main() -> set[int]:
        pids = set()
        async with iampg_asyncpg.create_pool(hourly_provider, min_size=1, max_size=2) as pool:
            for _ in range(JUMPS + 1):
                async with pool.acquire() as conn:
                    pids.add(await conn.fetchval("select pg_backend_pid()"))
                await ajump_an_hour(hourly)
        return pids

    assert len(asyncio.run(main())) == JUMPS + 1


def test_asyncpg_presets_set_the_pool(dsql: Emulator, start_emulator: EmulatorFactory) -> None:
    """DSQL: a 3300 s maximum age; Aurora Serverless: min_size 0, idle closed at 240 s."""

    async def settings(target: Any, **kwargs: Any) -> tuple[Any, ...]:
        pool = iampg_asyncpg.create_pool(target, **kwargs)
        age = pool._connect_kwargs
        return (
            pool._minsize,
            pool._max_inactive_connection_lifetime,
            age.get("timeout"),
            type(pool._setup.__self__).__name__ if pool._setup else None,
            getattr(pool._setup, "__self__", None) and pool._setup.__self__.lifetime,
        )

    aurora = start_emulator(preset="aurora-serverless", auto_pause=None, connect_latency=0)
    assert asyncio.run(settings(endpoint_for(dsql, user="admin"))) == (
        10,
        300.0,
        5.0,
        "_Lifetimes",
        3300.0,
    )
    assert asyncio.run(settings(endpoint_for(aurora), preset="aurora-serverless")) == (
        0,
        240.0,
        5.0,
        None,
        None,
    )
    assert asyncio.run(settings(endpoint_for(dsql, user="admin"), max_lifetime=0))[3] is None


# -- Django ---------------------------------------------------------------------------------


@pytest.fixture
def django_handler(django_configured: None) -> Iterator[Any]:
    """Yield a function making Django connections; close them and their pools after."""
    from django.db import utils as db_utils

    handlers: list[Any] = []

    def make(entry: dict[str, Any]) -> Any:
        handler = db_utils.ConnectionHandler({"default": entry})
        handlers.append(handler)
        return handler["default"]

    yield make
    for handler in handlers:
        for conn in handler.all(initialized_only=True):
            conn.close()
            conn.close_pool()


def _django_query(conn: Any) -> int:
    with conn.cursor() as cur:
        cur.execute("select pg_backend_pid()")
        pid: int = cur.fetchone()[0]
    return pid


@pytest.mark.slow  # waits out session caps in real time (the emulator's clock steps)
def test_django_native_pool_on_dsql_checks_connections(
    hourly: Emulator, hourly_provider: TokenProvider, django_handler: Any
) -> None:
    """The DSQL preset turns Django's health checks on: the native pool survives the cap."""
    from iampg.integrations.django import database

    entry = database(hourly_provider, pool={"min_size": 1, "max_size": 1, "timeout": 5.0})
    assert entry["CONN_HEALTH_CHECKS"] is True
    assert entry["OPTIONS"]["pool"]["max_lifetime"] == 3300.0
    assert "check" not in entry["OPTIONS"]["pool"]  # Django passes its own
    conn = django_handler(entry)
    pids = set()
    for _ in range(JUMPS + 1):
        pids.add(_django_query(conn))
        conn.close()  # the end of a request: the connection goes back to the pool
        jump_an_hour(hourly)
    assert len(pids) == JUMPS + 1


@pytest.mark.slow  # waits out session caps in real time (the emulator's clock steps)
def test_django_persistent_connection_on_dsql_checks_health(
    hourly: Emulator, hourly_provider: TokenProvider, django_handler: Any
) -> None:
    """Persistent connections (CONN_MAX_AGE) are checked at each request: the cap is survived."""
    from iampg.integrations.django import database

    conn = django_handler(database(hourly_provider, CONN_MAX_AGE=3300))
    pids = set()
    for _ in range(JUMPS + 1):
        conn.close_if_unusable_or_obsolete()  # what Django runs at request_started
        pids.add(_django_query(conn))
        conn.close_if_unusable_or_obsolete()  # and at request_finished
        jump_an_hour(hourly)
    assert len(pids) == JUMPS + 1


def test_django_aurora_preset_sets_the_pool(start_emulator: EmulatorFactory) -> None:
    """Aurora Serverless: the native pool may shrink to nothing and drops idle connections."""
    from iampg.integrations.django import database

    aurora = start_emulator(preset="aurora-serverless", auto_pause=None, connect_latency=0)
    entry = database(endpoint_for(aurora), pool=True, preset="aurora-serverless")
    pool = entry["OPTIONS"]["pool"]
    assert (pool["min_size"], pool["max_size"], pool["max_idle"], pool["timeout"]) == (
        0,
        4,
        240.0,
        60.0,
    )
    assert entry["CONN_HEALTH_CHECKS"] is True
    mine = database(endpoint_for(aurora), preset="rds", CONN_HEALTH_CHECKS=False)
    assert mine["CONN_HEALTH_CHECKS"] is False
    assert "CONN_HEALTH_CHECKS" not in database(endpoint_for(aurora), preset="rds")


@pytest.mark.slow  # waits out session caps in real time (the emulator's clock steps)
def test_psycopg_pool_for_reference(hourly: Emulator, hourly_provider: TokenProvider) -> None:
    """The same rounds through iampg's own pool, whose DSQL preset these follow."""
    import iampg

    pids = set()
    with iampg.ConnectionPool(
        provider=hourly_provider, min_size=1, max_size=1, timeout=5.0
    ) as pool:
        for _ in range(JUMPS + 1):
            with pool.connection() as conn:
                row = conn.execute("select pg_backend_pid()").fetchone()
                pids.add(row[0] if row else None)
            jump_an_hour(hourly)
    assert len(pids) == JUMPS + 1
