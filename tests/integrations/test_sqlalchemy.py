"""SQLAlchemy engines through the emulator: a fresh token for every new connection."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import psycopg
import pytest
import sqlalchemy
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

from iampg import TokenProvider
from iampg._dsn import connect_params
from iampg.emulator import Backend, Emulator
from iampg.errors import AuthenticationError, ConfigurationError
from iampg.integrations import sqlalchemy as iampg_sqlalchemy
from support import endpoint_for


def _who(engine: sqlalchemy.Engine) -> tuple[object, ...]:
    with engine.connect() as conn:
        row = conn.execute(text("select current_user, pg_backend_pid()")).one()
    return tuple(row)


@pytest.mark.slow
def test_engine_signs_for_every_new_connection_across_token_expiry(emulator: Emulator) -> None:
    """Two connections with the emulator's clock moved past expiry between them both work."""
    provider = TokenProvider(endpoint_for(emulator), clock=emulator.clock.monotonic)
    engine = iampg_sqlalchemy.create_engine(provider)
    try:
        first = _who(engine)
        token = provider.token()
        emulator.clock.advance(901.0)
        engine.dispose()  # the next checkout opens a new connection, which needs a token
        second = _who(engine)
    finally:
        engine.dispose()
    assert first[0] == second[0] == "postgres"
    assert first[1] != second[1]
    assert provider.token() != token
    assert provider.stats().refreshes == 2
    assert "X-Amz" not in repr(engine) + str(engine.url)


@pytest.mark.slow
def test_engine_with_a_frozen_password_fails_after_expiry(emulator: Emulator) -> None:
    """Control: a plain engine with one token in its arguments fails once that token expired."""
    ep = endpoint_for(emulator)
    provider = TokenProvider(ep, clock=emulator.clock.monotonic)
    params = connect_params(ep)
    engine = sqlalchemy.create_engine(
        "postgresql+psycopg://", connect_args={**params, "password": provider.token()}
    )
    try:
        _who(engine)
        emulator.clock.advance(901.0)
        engine.dispose()
        with pytest.raises(sa_exc.OperationalError, match="PAM authentication failed"):
            _who(engine)
    finally:
        engine.dispose()


@pytest.mark.slow
def test_pre_ping_replaces_a_cut_connection_with_a_new_token(
    emulator: Emulator, backend: Backend
) -> None:
    """pool_pre_ping finds a connection the server cut; its replacement signs a new token."""
    provider = TokenProvider(endpoint_for(emulator), clock=emulator.clock.monotonic)
    engine = iampg_sqlalchemy.create_engine(provider, pool_pre_ping=True, pool_size=1)
    try:
        first = _who(engine)
        emulator.clock.advance(901.0)
        # What Aurora's idle cut does to a pooled connection while the token expires.
        with psycopg.connect(backend.dsn, autocommit=True) as admin:
            admin.execute("select pg_terminate_backend(%s)", (first[1],))
        second = _who(engine)
    finally:
        engine.dispose()
    assert first[1] != second[1]
    assert provider.stats().refreshes == 2


@pytest.mark.slow
def test_refused_token_is_forgotten_and_explained(emulator: Emulator) -> None:
    """A token the server refuses is dropped from the cache and the error lists causes."""
    # The provider's clock does not move with the emulator's: it keeps a token the server
    # considers expired, as a client with a skewed clock would.
    provider = TokenProvider(endpoint_for(emulator))
    provider.token()
    emulator.clock.advance(901.0)
    engine = iampg_sqlalchemy.create_engine(provider)
    try:
        with pytest.raises(sa_exc.OperationalError) as info:
            _who(engine)
        assert isinstance(info.value.orig, AuthenticationError)
        assert provider.stats().expires_in is None  # invalidated: the next one is signed anew
        assert _who(engine)[0] == "postgres"
    finally:
        engine.dispose()


def test_connect_args_win_over_the_endpoint(emulator: Emulator) -> None:
    """connect_args given to the engine override the endpoint's own libpq parameters."""
    provider = TokenProvider(endpoint_for(emulator), clock=emulator.clock.monotonic)
    engine = iampg_sqlalchemy.create_engine(
        provider, connect_args={"application_name": "iampg-sa-test"}
    )
    try:
        with engine.connect() as conn:
            name = conn.execute(text("select current_setting('application_name')")).scalar()
    finally:
        engine.dispose()
    assert name == "iampg-sa-test"


def test_other_drivers_are_refused(emulator: Emulator) -> None:
    """install() refuses an engine that does not use the psycopg driver."""
    engine = sqlalchemy.create_engine("sqlite://")
    try:
        with pytest.raises(ConfigurationError, match="psycopg"):
            iampg_sqlalchemy.install(engine, endpoint_for(emulator))
    finally:
        engine.dispose()


@pytest.mark.slow
@pytest.mark.parametrize("frozen", [False, True], ids=["fresh-token", "frozen-token"])
def test_async_engine_across_token_expiry(emulator: Emulator, frozen: bool) -> None:
    """The async engine gets a new token from atoken() after expiry; a frozen one fails."""
    from sqlalchemy.ext.asyncio import create_async_engine

    ep = endpoint_for(emulator)
    provider = TokenProvider(ep, clock=emulator.clock.monotonic)

    async def main() -> tuple[object, object]:
        if frozen:
            engine = create_async_engine(
                "postgresql+psycopg://",
                connect_args={**connect_params(ep), "password": provider.token()},
            )
        else:
            engine = iampg_sqlalchemy.create_async_engine(provider)
        try:
            async with engine.connect() as conn:
                first = (await conn.execute(text("select pg_backend_pid()"))).scalar()
            await asyncio.to_thread(emulator.clock.advance, 901.0)
            await engine.dispose()
            async with engine.connect() as conn:
                second = (await conn.execute(text("select pg_backend_pid()"))).scalar()
        finally:
            await engine.dispose()
        return first, second

    if frozen:
        with pytest.raises(sa_exc.OperationalError, match="PAM authentication failed"):
            asyncio.run(main())
    else:
        first, second = asyncio.run(main())
        assert first != second
        assert provider.stats().refreshes == 2


def test_importing_iampg_imports_no_framework() -> None:
    """`import iampg` (and iampg.integrations) imports no framework or other driver."""
    code = (
        "import sys, iampg, iampg.integrations; "
        "print(sorted(m for m in ('sqlalchemy', 'asyncpg', 'django', 'psycopg2', 'botocore') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"
