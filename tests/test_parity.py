"""The sync and async twins behave alike: connect/aconnect, the two pools, the two retries.

Each scenario is written once and run through both twins against the emulator, so a change
to one twin that the other does not get fails here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import psycopg
import psycopg_pool
import pytest

import iampg
from iampg import Endpoint, TokenProvider
from iampg.emulator import Emulator
from support import TamperingSigner, endpoint_for

TWINS = ["sync", "async"]
DSQL_HOST = "abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws"
# What each statement does: runs, fails as a DSQL conflict, or fails as a plain error.
OK, CONFLICT, BROKEN = (
    "select 42",
    "do $$ begin raise exception 'conflict' using errcode = 'OC000'; end $$",
    "select 1/0",
)
SETTINGS_QUERY = "select current_user, current_setting('application_name')"
Row = tuple[Any, ...] | None


def fetch(twin: str, query: str, *args: Any, **kwargs: Any) -> tuple[Row, bool]:
    """Connect with ``connect`` or ``aconnect``; return ``query``'s first row and TLS in use."""
    if twin == "sync":
        with iampg.connect(*args, **kwargs) as conn:
            return conn.execute(query).fetchone(), conn.pgconn.ssl_in_use

    async def main() -> tuple[Row, bool]:
        async with await iampg.aconnect(*args, **kwargs) as conn:
            return await (await conn.execute(query)).fetchone(), conn.pgconn.ssl_in_use

    return asyncio.run(main())


@pytest.mark.parametrize("twin", TWINS)
def test_connect_signs_and_passes_psycopg_options(emulator: Emulator, twin: str) -> None:
    """Both twins log in over TLS as the endpoint's user and hand other options to psycopg."""
    row = fetch(twin, SETTINGS_QUERY, endpoint_for(emulator), application_name=f"parity-{twin}")
    assert row == (("postgres", f"parity-{twin}"), True)


@pytest.mark.parametrize("twin", TWINS)
def test_connect_retries_a_refused_token_once(emulator: Emulator, twin: str) -> None:
    """A refused token is forgotten and the connect tried once more with a new one."""
    signer = TamperingSigner("signature", times=1)
    provider = TokenProvider(endpoint_for(emulator), signer=signer)
    assert fetch(twin, OK, provider=provider) == ((42,), True)
    assert signer.calls == 2


@pytest.mark.parametrize("twin", TWINS)
def test_connect_refused_twice_explains_the_causes(emulator: Emulator, twin: str) -> None:
    """A token refused again after the retry is an AuthenticationError listing the causes."""
    signer = TamperingSigner("signature")
    provider = TokenProvider(endpoint_for(emulator), signer=signer)
    with pytest.raises(iampg.AuthenticationError) as info:
        fetch(twin, OK, provider=provider)
    assert "likely causes" in str(info.value)
    assert isinstance(info.value, psycopg.OperationalError)
    assert signer.calls == 2


@pytest.mark.parametrize("twin", TWINS)
def test_connect_refuses_a_preset_that_does_not_fit(emulator: Emulator, twin: str) -> None:
    """A DSQL preset for an RDS endpoint is a ConfigurationError before anything is signed."""
    signer = TamperingSigner("signature")
    provider = TokenProvider(endpoint_for(emulator), signer=signer)
    with pytest.raises(iampg.ConfigurationError, match="dsql"):
        fetch(twin, OK, provider=provider, preset="dsql")
    assert signer.calls == 0


@pytest.mark.parametrize("twin", TWINS)
def test_connect_returns_the_connection_class_asked_for(emulator: Emulator, twin: str) -> None:
    """connection_class is honoured: the connection is an instance of the caller's class."""
    if twin == "sync":

        class Mine(psycopg.Connection[Any]):
            pass

        with iampg.connect(endpoint_for(emulator), connection_class=Mine) as conn:
            assert type(conn) is Mine
        return

    class AsyncMine(psycopg.AsyncConnection[Any]):
        pass

    async def main() -> None:
        conn = await iampg.aconnect(endpoint_for(emulator), connection_class=AsyncMine)
        async with conn:
            assert type(conn) is AsyncMine

    asyncio.run(main())


# -- pools -------------------------------------------------------------------------------


def pool_settings(twin: str, endpoint: Endpoint | str, **options: Any) -> dict[str, Any]:
    """Return what ConnectionPool or AsyncConnectionPool made of ``options``, without opening."""

    def describe(
        pool: psycopg_pool.ConnectionPool[Any] | psycopg_pool.AsyncConnectionPool[Any],
    ) -> dict[str, Any]:
        return {
            "conninfo": pool.conninfo,
            "min_size": pool.min_size,
            "max_size": pool.max_size,
            "timeout": pool.timeout,
            "max_idle": pool.max_idle,
            "max_lifetime": pool.max_lifetime,
            "reconnect_timeout": pool.reconnect_timeout,
            "checks": pool._check is not None,
        }

    if twin == "sync":
        return describe(iampg.ConnectionPool(endpoint, open=False, **options))

    async def main() -> dict[str, Any]:
        return describe(iampg.AsyncConnectionPool(endpoint, open=False, **options))

    return asyncio.run(main())


@pytest.mark.parametrize(
    ("host", "preset"),
    [
        ("db.cluster-abc123.us-east-1.rds.amazonaws.com", None),
        ("db.cluster-abc123.us-east-1.rds.amazonaws.com", "rds"),
        ("db.cluster-abc123.us-east-1.rds.amazonaws.com", "aurora-serverless"),
        ("db.cluster-abc123.us-east-1.rds.amazonaws.com", "aurora-express"),
        (DSQL_HOST, None),
        (DSQL_HOST, "dsql"),
    ],
)
def test_pools_apply_the_same_preset_defaults(host: str, preset: str | None) -> None:
    """For every preset both pools get the same conninfo, sizes, timeouts, lifetime and check."""
    endpoint = f"postgresql://admin@{host}/postgres"
    options: dict[str, Any] = {} if preset is None else {"preset": preset}
    assert pool_settings("sync", endpoint, **options) == pool_settings("async", endpoint, **options)


def test_pools_let_the_caller_override_the_same_way() -> None:
    """A caller's pool options win over the preset's in both pools alike."""
    endpoint = f"postgresql://admin@{DSQL_HOST}/postgres"
    options = {"min_size": 2, "max_idle": 60.0, "max_lifetime": 600.0, "timeout": 5.0}
    sync, asynchronous = (
        pool_settings("sync", endpoint, **options),
        pool_settings("async", endpoint, **options),
    )
    assert sync == asynchronous
    assert (sync["min_size"], sync["max_idle"], sync["max_lifetime"]) == (2, 60.0, 600.0)


def pooled_across_expiry(twin: str, emulator: Emulator, provider: TokenProvider) -> list[Any]:
    """Query through a pool, let the first token expire, query on a new connection; return rows."""

    def expire() -> None:
        emulator.clock.advance(901.0)  # the first token has expired

    if twin == "sync":
        with iampg.ConnectionPool(provider=provider, min_size=1, max_size=1, open=True) as pool:
            pool.wait()  # no connection attempt is still under way when the clock moves
            with pool.connection() as conn:
                first = conn.execute(OK).fetchone()
            expire()
            pool.drain()  # every connection from now on is new and needs a token
            with pool.connection() as conn:
                second = conn.execute(OK).fetchone()
            return [first, second, pool.get_stats().get("connections_errors", 0)]

    async def main() -> list[Any]:
        async with iampg.AsyncConnectionPool(provider=provider, min_size=1, max_size=1) as pool:
            await pool.wait()
            async with pool.connection() as conn:
                first = await (await conn.execute(OK)).fetchone()
            expire()
            await pool.drain()
            async with pool.connection() as conn:
                second = await (await conn.execute(OK)).fetchone()
            return [first, second, pool.get_stats().get("connections_errors", 0)]

    return asyncio.run(main())


@pytest.mark.parametrize("twin", TWINS)
def test_pools_sign_new_connections_after_the_token_expired(emulator: Emulator, twin: str) -> None:
    """After the first token expired, both pools' new connections get a new token and work."""
    provider = TokenProvider(endpoint_for(emulator), clock=emulator.clock.monotonic)
    assert pooled_across_expiry(twin, emulator, provider) == [(42,), (42,), 0]
    assert provider.stats().refreshes == 2


# -- retry_transaction / aretry_transaction ---------------------------------------------------


def retry(
    twin: str, emulator: Emulator, statement: Callable[[int], str], *, pooled: bool, **options: Any
) -> tuple[Any, int]:
    """Run ``retry_transaction`` or its twin on a connection or a pool; return result, calls.

    Attempt ``n`` executes ``statement(n)`` and returns its first row. ``calls`` is also
    returned through the exception's ``calls`` attribute when the retry raises.
    """
    endpoint = endpoint_for(emulator)
    calls = 0

    def count() -> str:
        nonlocal calls
        calls += 1
        return statement(calls)

    try:
        if twin == "sync":

            def work(conn: psycopg.Connection[Any]) -> Any:
                return conn.execute(count()).fetchone()

            if pooled:
                with iampg.ConnectionPool(endpoint, min_size=1, max_size=1, open=True) as pool:
                    return iampg.retry_transaction(pool, work, **options), calls
            with iampg.connect(endpoint) as conn:
                return iampg.retry_transaction(conn, work, **options), calls

        async def awork(conn: psycopg.AsyncConnection[Any]) -> Any:
            return await (await conn.execute(count())).fetchone()

        async def main() -> Any:
            if pooled:
                async with iampg.AsyncConnectionPool(endpoint, min_size=1, max_size=1) as pool:
                    return await iampg.aretry_transaction(pool, awork, **options)
            async with await iampg.aconnect(endpoint) as conn:
                return await iampg.aretry_transaction(conn, awork, **options)

        return asyncio.run(main()), calls
    except Exception as exc:
        exc.calls = calls  # type: ignore[attr-defined]
        raise


FAST = {"base": 0.001, "cap": 0.01}


@pytest.mark.parametrize("pooled", [False, True], ids=["connection", "pool"])
@pytest.mark.parametrize("twin", TWINS)
def test_retry_runs_a_conflict_again(emulator: Emulator, twin: str, pooled: bool) -> None:
    """A DSQL conflict rolls back and the transaction runs again until it commits."""
    result = retry(twin, emulator, lambda n: CONFLICT if n < 3 else OK, pooled=pooled, **FAST)
    assert result == ((42,), 3)


@pytest.mark.parametrize("pooled", [False, True], ids=["connection", "pool"])
@pytest.mark.parametrize("twin", TWINS)
def test_retry_gives_up_after_the_last_attempt(emulator: Emulator, twin: str, pooled: bool) -> None:
    """When every attempt conflicts, the last attempt's error surfaces after ``attempts`` runs."""
    with pytest.raises(psycopg.Error) as info:
        retry(twin, emulator, lambda n: CONFLICT, pooled=pooled, attempts=3, **FAST)
    assert info.value.sqlstate == "OC000"
    assert info.value.calls == 3  # type: ignore[attr-defined]


@pytest.mark.parametrize("twin", TWINS)
def test_retry_raises_other_errors_at_once(emulator: Emulator, twin: str) -> None:
    """An error that is not a conflict surfaces on the first attempt."""
    with pytest.raises(psycopg.errors.DivisionByZero) as info:
        retry(twin, emulator, lambda n: BROKEN, pooled=False, **FAST)
    assert info.value.calls == 1  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("options", "named"), [({"attempts": 0}, "attempts"), ({"base": 1.0, "cap": 0.5}, "base")]
)
@pytest.mark.parametrize("twin", TWINS)
def test_retry_refuses_bad_settings(
    emulator: Emulator, twin: str, options: dict[str, Any], named: str
) -> None:
    """attempts below 1 or a cap below base are configuration errors, before any attempt."""
    with pytest.raises(iampg.ConfigurationError, match=named) as info:
        retry(twin, emulator, lambda n: OK, pooled=False, **options)
    assert info.value.calls == 0  # type: ignore[attr-defined]
