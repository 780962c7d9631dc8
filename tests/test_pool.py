"""Connections and pools through the emulator: fresh tokens, expiry, and the services' refusals."""

from __future__ import annotations

import asyncio
import re

import psycopg
import psycopg_pool
import pytest
from psycopg.conninfo import make_conninfo

import iampg
from fakes import CountingSigner
from iampg import Endpoint, TokenProvider
from iampg._dsn import connect_params
from iampg.emulator import Emulator
from support import RecordingSigner, TamperingSigner, endpoint_for


@pytest.fixture
def moved_emulator(emulator: Emulator) -> Emulator:
    """An emulator whose clock the test moves; providers share it as their monotonic clock."""
    return emulator


def test_connect_runs_a_query(emulator: Emulator) -> None:
    """iampg.connect signs a token that the emulator accepts over verify-full TLS."""
    with iampg.connect(endpoint_for(emulator)) as conn:
        row = conn.execute("select current_user, ssl from pg_stat_ssl, pg_backend_pid()").fetchone()
    assert row is not None
    assert row[0] == "postgres"


@pytest.mark.slow
@pytest.mark.parametrize("frozen", [False, True], ids=["fresh-token", "frozen-token"])
def test_pool_keeps_working_across_token_expiry(moved_emulator: Emulator, frozen: bool) -> None:
    """New connections after the first token expired succeed; a frozen token fails (control)."""
    emu = moved_emulator
    ep = endpoint_for(emu)
    provider = TokenProvider(ep, clock=emu.clock.monotonic)
    if frozen:
        # What hand-written glue often does: one token baked into the pool's arguments.
        pool: psycopg_pool.ConnectionPool[psycopg.Connection[object]] = psycopg_pool.ConnectionPool(
            make_conninfo(**connect_params(ep)),
            kwargs={"password": provider.token()},
            min_size=1,
            max_size=2,
            timeout=3.0,
            open=False,
        )
    else:
        pool = iampg.ConnectionPool(
            provider=provider, min_size=1, max_size=2, timeout=3.0, open=False
        )
    with pool:
        with pool.connection() as conn:
            conn.execute("create temp table t (x int)")
        emu.clock.advance(901.0)  # the first token has expired for both sides
        pool.drain()  # every new physical connection needs a token now
        if frozen:
            # The deliberate PoolTimeout: a short wait proves it as well as a long one.
            with pytest.raises(psycopg_pool.PoolTimeout), pool.connection(timeout=0.5):
                pass
        else:
            with pool.connection() as conn:
                assert conn.execute("select 1").fetchone() == (1,)
            assert pool.get_stats().get("connections_errors", 0) == 0


@pytest.mark.slow
def test_async_pool_keeps_working_across_token_expiry(moved_emulator: Emulator) -> None:
    """The async pool gets fresh tokens from atoken() after the first one expired."""
    emu = moved_emulator
    provider = TokenProvider(endpoint_for(emu), clock=emu.clock.monotonic)

    async def main() -> tuple[object, object]:
        async with iampg.AsyncConnectionPool(
            provider=provider, min_size=1, max_size=2, timeout=3.0, open=False
        ) as pool:
            async with pool.connection() as conn:
                first = await (await conn.execute("select 1")).fetchone()
            emu.clock.advance(901.0)
            await pool.drain()
            async with pool.connection() as conn:
                second = await (await conn.execute("select 2")).fetchone()
        return first, second

    assert asyncio.run(main()) == ((1,), (2,))


@pytest.mark.parametrize("damage", ["signature", "user"])
def test_tampered_token_gets_pam_failure(emulator: Emulator, damage: str) -> None:
    """A token with a wrong signature or user is refused with RDS's exact text."""
    provider = TokenProvider(endpoint_for(emulator), signer=TamperingSigner(damage))
    with pytest.raises(
        psycopg.OperationalError, match='PAM authentication failed for user "postgres"'
    ):
        iampg.connect(provider=provider)


@pytest.mark.slow
def test_expired_token_is_refused_then_connect_retries_with_a_new_one(
    moved_emulator: Emulator,
) -> None:
    """An expired token gets RDS's PAM text; connect() forgets it and retries once, signed anew."""
    emu = moved_emulator
    signer = RecordingSigner()
    # A provider on real time keeps its token while the emulator's clock says it expired.
    provider = TokenProvider(endpoint_for(emu), signer=signer)
    iampg.connect(provider=provider).close()
    emu.clock.advance(901.0)
    with iampg.connect(provider=provider) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    assert signer.calls == 2
    outcomes = [(e.outcome, e.reason) for e in emu.events]
    assert outcomes[-2:] == [("rejected", "token expired"), ("accepted", "")]


def test_refused_twice_raises_authentication_error_with_causes(emulator: Emulator) -> None:
    """A token refused again after the retry becomes AuthenticationError listing causes."""
    signer = TamperingSigner("signature")
    provider = TokenProvider(endpoint_for(emulator), signer=signer)
    with pytest.raises(iampg.AuthenticationError) as info:
        iampg.connect(provider=provider)
    text = str(info.value)
    assert 'PAM authentication failed for user "postgres"' in text
    assert "likely causes" in text
    assert 'GRANT rds_iam TO "postgres"' in text
    assert isinstance(info.value, psycopg.OperationalError)
    assert signer.calls == 2


@pytest.mark.slow
def test_pool_signs_afresh_after_the_server_refuses_a_token(emulator: Emulator) -> None:
    """A refused token is forgotten: the pool's next attempt gets a new, valid one."""
    signer = TamperingSigner("signature", times=1)
    provider = TokenProvider(endpoint_for(emulator), signer=signer)
    with (
        iampg.ConnectionPool(
            provider=provider, min_size=0, max_size=1, timeout=10.0, open=False
        ) as pool,
        pool.connection() as conn,
    ):
        assert conn.execute("select 1").fetchone() == (1,)
    assert signer.calls == 2
    outcomes = [(e.outcome, e.reason) for e in emulator.events]
    assert outcomes == [("rejected", "signature mismatch"), ("accepted", "")]


def test_no_tls_becomes_an_authentication_error_naming_tls(emulator: Emulator) -> None:
    """The 'no encryption' refusal is explained: IAM users must use TLS."""
    ep = endpoint_for(emulator, sslmode="disable")
    with pytest.raises(iampg.AuthenticationError, match="did not use TLS"):
        iampg.connect(ep)


def test_plaintext_attempt_gets_no_encryption_text(emulator: Emulator) -> None:
    """Without TLS the gateway answers like RDS: pg_hba.conf rejects, no encryption."""
    ep = endpoint_for(emulator, sslmode="disable")  # loopback: iampg allows it
    with pytest.raises(
        psycopg.OperationalError,
        match=re.escape(
            'pg_hba.conf rejects connection for host "127.0.0.1", user "postgres", '
            'database "postgres", no encryption'
        ),
    ):
        iampg.connect(ep)


def test_iampg_refuses_plaintext_to_a_remote_host() -> None:
    """No token leaves unencrypted for a non-loopback address: refused before signing."""
    signer = CountingSigner()
    ep = Endpoint("mydb.cluster-abc.us-east-1.rds.amazonaws.com", user="app", sslmode="disable")
    with pytest.raises(iampg.ConfigurationError, match="unencrypted"):
        iampg.connect(provider=TokenProvider(ep, signer=signer))
    assert signer.calls == 0
