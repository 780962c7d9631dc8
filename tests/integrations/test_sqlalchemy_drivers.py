"""SQLAlchemy through the emulator on every PostgreSQL driver: psycopg(2), pg8000, asyncpg."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import pytest
import sqlalchemy
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

import iampg
from fakes import CountingSigner
from iampg import Endpoint, TokenProvider
from iampg.emulator import Emulator
from iampg.integrations import sqlalchemy as iampg_sqlalchemy
from support import ContendedCounter, CutOnce, EmulatorFactory, endpoint_for

# (driver, asyncio?) as SQLAlchemy users pick them: postgresql+<driver>://
DRIVERS = [
    ("psycopg", False),
    ("psycopg2", False),
    ("pg8000", False),
    ("psycopg", True),
    ("asyncpg", True),
]
IDS = ["psycopg", "psycopg2", "pg8000", "psycopg-async", "asyncpg"]


class Engine:
    """One engine, sync or asyncio, driven the same way from a test."""

    def __init__(self, driver: str, *, is_async: bool, target: Any, **kwargs: Any) -> None:
        self.is_async = is_async
        self.loop = asyncio.new_event_loop() if is_async else None
        self.engine: sqlalchemy.Engine | AsyncEngine
        if is_async:
            self.engine = iampg_sqlalchemy.create_async_engine(target, driver=driver, **kwargs)
        else:
            self.engine = iampg_sqlalchemy.create_engine(target, driver=driver, **kwargs)

    @property
    def sync_engine(self) -> sqlalchemy.Engine:
        engine = self.engine
        return engine.sync_engine if isinstance(engine, AsyncEngine) else engine

    def one(self, sql: str) -> tuple[Any, ...]:
        """Run ``sql`` on a pooled connection; return its one row."""
        engine = self.engine
        if isinstance(engine, AsyncEngine):
            assert self.loop is not None

            async def run() -> tuple[Any, ...]:
                async with engine.connect() as conn:
                    return tuple((await conn.execute(text(sql))).one())

            return self.loop.run_until_complete(run())
        with engine.connect() as conn:
            return tuple(conn.execute(text(sql)).one())

    def transaction(self, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn`` with retry_transaction (its async twin for an asyncio engine)."""
        engine = self.engine
        if isinstance(engine, AsyncEngine):
            assert self.loop is not None

            async def work(conn: Any) -> Any:
                return await conn.run_sync(fn)

            return self.loop.run_until_complete(
                iampg_sqlalchemy.aretry_transaction(engine, work, base=0.001, cap=0.01)
            )
        return iampg_sqlalchemy.retry_transaction(engine, fn, base=0.001, cap=0.01)

    def dispose(self) -> None:
        """Close the pool's connections: the next query opens a new one."""
        engine = self.engine
        if isinstance(engine, AsyncEngine):
            assert self.loop is not None
            self.loop.run_until_complete(engine.dispose())
        else:
            engine.dispose()

    def close(self) -> None:
        self.dispose()
        if self.loop is not None:
            self.loop.close()


@pytest.fixture
def engines() -> Iterator[list[Engine]]:
    """Collect the engines a test makes; close them after it."""
    made: list[Engine] = []
    yield made
    for engine in made:
        engine.close()


def _engine(made: list[Engine], driver: str, is_async: bool, target: Any, **kw: Any) -> Engine:
    engine = Engine(driver, is_async=is_async, target=target, **kw)
    made.append(engine)
    return engine


@pytest.mark.slow
@pytest.mark.parametrize(("driver", "is_async"), DRIVERS, ids=IDS)
def test_every_new_connection_signs_across_token_expiry(
    emulator: Emulator, engines: list[Engine], driver: str, is_async: bool
) -> None:
    """Each driver authenticates over verify-full TLS, and again after the token expired."""
    provider = TokenProvider(endpoint_for(emulator), clock=emulator.clock.monotonic)
    engine = _engine(engines, driver, is_async, provider)
    assert engine.sync_engine.dialect.driver == driver
    first = engine.one("select current_user, pg_backend_pid()")
    emulator.clock.advance(901.0)
    engine.dispose()  # the next connection is new: it needs a new token
    second = engine.one("select current_user, pg_backend_pid()")
    assert first[0] == second[0] == "postgres"
    assert first[1] != second[1]
    assert provider.stats().refreshes == 2
    assert "X-Amz" not in repr(engine.engine) + str(engine.engine.url)


@pytest.mark.slow
@pytest.mark.parametrize(("driver", "is_async"), DRIVERS, ids=IDS)
def test_refused_token_is_forgotten_and_explained(
    emulator: Emulator, engines: list[Engine], driver: str, is_async: bool
) -> None:
    """A refused token is dropped; the error is iampg's and the driver's, listing causes."""
    # The provider's clock does not move with the emulator's: it keeps a token the server
    # considers expired, as a client with a skewed clock would.
    provider = TokenProvider(endpoint_for(emulator))
    provider.token()
    emulator.clock.advance(901.0)
    engine = _engine(engines, driver, is_async, provider)
    with pytest.raises(sa_exc.OperationalError) as info:
        engine.one("select 1")
    orig = info.value.orig
    assert isinstance(orig, iampg.AuthenticationError)
    assert isinstance(orig, engine.sync_engine.dialect.loaded_dbapi.OperationalError)
    assert 'PAM authentication failed for user "postgres"' in str(orig)
    assert "likely causes" in str(orig)
    assert provider.stats().expires_in is None  # forgotten: the next connection signs anew
    assert engine.one("select current_user") == ("postgres",)


@pytest.fixture
def unnamed(start_emulator: EmulatorFactory) -> Emulator:
    """An emulator on 127.0.0.2, an address its certificate does not name (it names 127.0.0.1)."""
    return start_emulator(listen_host="127.0.0.2")


@pytest.mark.parametrize(("driver", "is_async"), DRIVERS, ids=IDS)
def test_tls_verifies_the_signed_name_while_dialling_the_address(
    unnamed: Emulator, engines: list[Engine], driver: str, is_async: bool
) -> None:
    """verify-full towards an address the certificate lacks works: the signed name is checked."""
    engine = _engine(engines, driver, is_async, endpoint_for(unnamed))
    assert engine.one("select current_user") == ("postgres",)


@pytest.mark.parametrize(("driver", "is_async"), [("pg8000", False), ("asyncpg", True)])
def test_without_iampg_the_driver_verifies_the_address(
    unnamed: Emulator, driver: str, is_async: bool
) -> None:
    """Control: pg8000 and asyncpg alone check the dialled address, which the cert lacks."""
    context = ssl.create_default_context(cafile=str(unnamed.ca_file))
    url = f"postgresql+{driver}://postgres@{unnamed.listen_host}:{unnamed.port}/postgres"
    key = "ssl" if driver == "asyncpg" else "ssl_context"
    if is_async:
        from sqlalchemy.ext.asyncio import create_async_engine

        async def main() -> None:
            engine = create_async_engine(url, connect_args={key: context})
            try:
                async with engine.connect():
                    pass
            finally:
                await engine.dispose()

        with pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch"):
            asyncio.run(main())
        return
    engine = sqlalchemy.create_engine(url, connect_args={key: context})
    try:
        with (
            pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch"),
            engine.connect(),
        ):
            pass
    finally:
        engine.dispose()


OVERRIDES = {
    "psycopg": ({"host": "db.example.com"}, {"sslmode": "disable"}),
    "psycopg2": ({"host": "db.example.com"}, {"sslmode": "disable"}),
    "pg8000": ({"host": "127.0.0.3"}, {"ssl_context": False}),
    "asyncpg": ({"host": "127.0.0.3"}, {"ssl": False}),
}


@pytest.mark.parametrize(("driver", "is_async"), DRIVERS, ids=IDS)
def test_connect_args_that_redirect_or_strip_tls_are_refused(
    engines: list[Engine], driver: str, is_async: bool
) -> None:
    """Another host, or no TLS towards a remote address, in connect_args: refused, unsigned."""
    signer = CountingSigner()
    # 0.0.0.0 is not loopback to the guard, yet a dial to it would never leave this machine.
    ep = Endpoint("mydb.cluster-abc.us-east-1.rds.amazonaws.com", user="app", hostaddr="0.0.0.0")
    provider = TokenProvider(ep, signer=signer)
    elsewhere, plaintext = OVERRIDES[driver]
    for connect_args, message in ((elsewhere, "signed for"), (plaintext, "unencrypted")):
        engine = _engine(engines, driver, is_async, provider, connect_args=connect_args)
        with pytest.raises(iampg.ConfigurationError, match=message):
            engine.one("select 1")
    assert signer.calls == 0


@pytest.mark.parametrize(("driver", "is_async"), DRIVERS, ids=IDS)
def test_the_url_scheme_names_the_driver(
    emulator: Emulator, engines: list[Engine], driver: str, is_async: bool
) -> None:
    """postgresql+<driver>://…, as SQLAlchemy users write it, picks the driver."""
    ep = endpoint_for(emulator)
    query = "&".join(f"{k}={quote(v, safe='')}" for k, v in ep.params.items())
    url = (
        f"postgresql+{driver}://postgres@{emulator.host}:{emulator.port}/postgres"
        f"?hostaddr={emulator.listen_host}&{query}"
    )
    factory = iampg_sqlalchemy.create_async_engine if is_async else iampg_sqlalchemy.create_engine
    engine: Any = factory(url)
    try:
        sync_engine = engine.sync_engine if is_async else engine
        assert sync_engine.dialect.driver == driver
        assert str(engine.url).startswith(f"postgresql+{driver}://postgres@{emulator.host}")
    finally:
        if is_async:
            asyncio.run(engine.dispose())
        else:
            engine.dispose()


def test_wrong_driver_choices_are_refused(emulator: Emulator) -> None:
    """A driver of the other kind, or one the URL contradicts, is a configuration error."""
    ep = endpoint_for(emulator)
    with pytest.raises(iampg.ConfigurationError, match="create_async_engine"):
        iampg_sqlalchemy.create_engine(ep, driver="asyncpg")
    with pytest.raises(iampg.ConfigurationError, match="create_engine"):
        iampg_sqlalchemy.create_async_engine(ep, driver="pg8000")
    with pytest.raises(iampg.ConfigurationError, match="pass one of them"):
        iampg_sqlalchemy.create_engine(f"postgresql+pg8000://postgres@{ep.host}", driver="psycopg")
    engine = sqlalchemy.create_engine("sqlite://")
    try:
        with pytest.raises(iampg.ConfigurationError, match="pg8000"):
            iampg_sqlalchemy.install(engine, ep)
    finally:
        engine.dispose()


def test_pg8000_refuses_libpq_parameters_it_cannot_honour(emulator: Emulator) -> None:
    """A libpq parameter pg8000 has no equivalent for is refused, not ignored."""
    with pytest.raises(iampg.ConfigurationError, match="keepalives"):
        iampg_sqlalchemy.create_engine(endpoint_for(emulator, keepalives="1"), driver="pg8000")


@pytest.mark.parametrize(("driver", "is_async"), DRIVERS, ids=IDS)
def test_conflicts_run_again_on_every_driver(
    emulator: Emulator, engines: list[Engine], driver: str, is_async: bool
) -> None:
    """retry_transaction finds each driver's 40001 inside SQLAlchemy's error and reruns."""
    counter = ContendedCounter(endpoint_for(emulator), "iampg_retry_drivers")
    engine = _engine(engines, driver, is_async, endpoint_for(emulator))
    calls = 0

    def increment(conn: sqlalchemy.Connection) -> int:
        nonlocal calls
        calls += 1
        conn.execute(text("set transaction isolation level repeatable read"))
        n = int(conn.execute(text("select n from iampg_retry_drivers where id = 1")).scalar_one())
        if calls == 1:  # another transaction commits in between: ours must conflict
            counter.bump_elsewhere()
        conn.execute(text("update iampg_retry_drivers set n = :n where id = 1"), {"n": n + 1})
        return n + 1

    assert engine.transaction(increment) == 101
    assert calls == 2
    assert counter.value() == 101


@pytest.mark.parametrize(("driver", "is_async"), DRIVERS, ids=IDS)
def test_an_abrupt_cut_runs_again_on_every_driver(
    emulator: Emulator, engines: list[Engine], driver: str, is_async: bool
) -> None:
    """A connection cut without a word before COMMIT is replaced, whatever the driver."""
    engine = _engine(engines, driver, is_async, endpoint_for(emulator), pool_size=1)
    work = CutOnce(emulator)
    assert engine.transaction(work) == 9
    assert work.calls == 2
