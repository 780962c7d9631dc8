"""The public API's types, pinned with assert_type (checked by mypy --strict) and isinstance."""

from __future__ import annotations

from typing import Any

import psycopg
import psycopg_pool
from psycopg.rows import DictRow, TupleRow, dict_row
from typing_extensions import assert_type

import iampg
from fakes import CountingSigner

EP = iampg.Endpoint("mydb.cluster-abc.us-east-1.rds.amazonaws.com", user="app")


def _connections(ep: iampg.Endpoint) -> None:
    """Never run: mypy checks what connect() and aconnect() return."""
    assert_type(iampg.connect(ep), psycopg.Connection[TupleRow])
    assert_type(iampg.connect(ep, row_factory=dict_row), psycopg.Connection[DictRow])
    assert_type(
        iampg.connect(ep, connection_class=psycopg.Connection[DictRow]),
        psycopg.Connection[DictRow],
    )


async def _async_connections(ep: iampg.Endpoint) -> None:
    """Never run: mypy checks what aconnect() returns."""
    assert_type(await iampg.aconnect(ep), psycopg.AsyncConnection[TupleRow])
    assert_type(await iampg.aconnect(ep, row_factory=dict_row), psycopg.AsyncConnection[DictRow])
    assert_type(
        await iampg.aconnect(ep, connection_class=psycopg.AsyncConnection[DictRow]),
        psycopg.AsyncConnection[DictRow],
    )


def _pools(ep: iampg.Endpoint) -> None:
    """Never run: mypy checks the pools' generic parameters and what they hand out."""
    pool = iampg.ConnectionPool(ep)
    assert_type(pool, iampg.ConnectionPool[psycopg.Connection[TupleRow]])
    with pool.connection() as conn:
        assert_type(conn, psycopg.Connection[TupleRow])
    dict_pool = iampg.ConnectionPool(
        ep, connection_class=psycopg.Connection[DictRow], kwargs={"row_factory": dict_row}
    )
    assert_type(dict_pool, iampg.ConnectionPool[psycopg.Connection[DictRow]])
    with dict_pool.connection() as dict_conn:
        row = dict_conn.execute("select 1 as x").fetchone()
        assert_type(row, DictRow | None)
    stock: psycopg_pool.ConnectionPool[psycopg.Connection[TupleRow]] = pool
    assert_type(stock, psycopg_pool.ConnectionPool[psycopg.Connection[TupleRow]])


async def _async_pools(ep: iampg.Endpoint) -> None:
    """Never run: mypy checks the async pool's generic parameter."""
    apool = iampg.AsyncConnectionPool(ep)
    assert_type(apool, iampg.AsyncConnectionPool[psycopg.AsyncConnection[TupleRow]])
    async with apool.connection() as conn:
        assert_type(conn, psycopg.AsyncConnection[TupleRow])
    dict_pool = iampg.AsyncConnectionPool(ep, connection_class=psycopg.AsyncConnection[DictRow])
    assert_type(dict_pool, iampg.AsyncConnectionPool[psycopg.AsyncConnection[DictRow]])


def _helpers(ep: iampg.Endpoint, provider: iampg.TokenProvider) -> None:
    """Never run: mypy checks the DSN helpers and the provider."""
    assert_type(iampg.url(ep), str)
    assert_type(iampg.conninfo(ep), str)
    assert_type(iampg.env(ep), dict[str, str])
    assert_type(iampg.url(provider), str)  # a provider first, as the integrations take it
    assert_type(iampg.env(provider), dict[str, str])
    assert_type(iampg.sqlalchemy_url(provider, driver="asyncpg"), str)
    assert_type(provider.token(), str)
    assert_type(provider.endpoint, iampg.Endpoint)


def accepts_any_pool(pool: psycopg_pool.ConnectionPool[Any]) -> str:
    """A function typed for psycopg_pool's pool accepts iampg's."""
    return str(pool.name)


def test_pools_are_psycopg_pool_subclasses() -> None:
    """iampg's pools are classes: isinstance works, and psycopg_pool code accepts them."""
    provider = iampg.TokenProvider(EP, signer=CountingSigner())
    pool = iampg.ConnectionPool(provider=provider, open=False)
    apool = iampg.AsyncConnectionPool(provider=provider)
    assert isinstance(pool, iampg.ConnectionPool)
    assert isinstance(pool, psycopg_pool.ConnectionPool)
    assert isinstance(apool, iampg.AsyncConnectionPool)
    assert isinstance(apool, psycopg_pool.AsyncConnectionPool)
    assert accepts_any_pool(pool) == pool.name
    assert issubclass(pool.connection_class, psycopg.Connection)
    typed: iampg.ConnectionPool[psycopg.Connection[DictRow]] = iampg.ConnectionPool(
        provider=provider, connection_class=psycopg.Connection[DictRow], open=False
    )
    assert isinstance(typed, iampg.ConnectionPool)
