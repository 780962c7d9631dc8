"""psycopg2 through the emulator: connect, pools across token expiry, refusals and the guard."""

from __future__ import annotations

from typing import Any

import psycopg2
import psycopg2.extensions
import psycopg2.extras
import psycopg2.pool
import pytest

import iampg
from fakes import CountingSigner
from iampg import Endpoint, TokenProvider
from iampg._dsn import connect_params
from iampg.emulator import Backend, Emulator
from iampg.integrations import psycopg2 as iampg_psycopg2
from support import ContendedCounter, endpoint_for, paused_serverless, terminate_backend


def _who(conn: Any) -> tuple[Any, ...]:
    with conn.cursor() as cur:
        cur.execute("select current_user, pg_backend_pid()")
        row: tuple[Any, ...] = cur.fetchone()
    return row


def test_connect_runs_a_query_over_verified_tls(emulator: Emulator) -> None:
    """connect() signs a token the emulator accepts, over TLS verifying the signed name."""
    provider = TokenProvider(endpoint_for(emulator))
    conn = iampg_psycopg2.connect(provider)
    try:
        assert _who(conn)[0] == "postgres"
        assert conn.info.ssl_in_use
        params = conn.get_dsn_parameters()
        assert params["host"] == emulator.host
        assert params["sslmode"] == "verify-full"
        assert "password" not in params
    finally:
        conn.close()


def test_connect_kwargs_win_over_the_endpoint(emulator: Emulator) -> None:
    """libpq parameters and cursor_factory given to connect() reach psycopg2."""
    conn = iampg_psycopg2.connect(
        endpoint_for(emulator),
        application_name="iampg-psycopg2-test",
        cursor_factory=psycopg2.extras.RealDictCursor,
    )
    try:
        with conn.cursor() as cur:
            cur.execute("select current_setting('application_name') as name")
            assert cur.fetchone() == {"name": "iampg-psycopg2-test"}
    finally:
        conn.close()


@pytest.mark.parametrize("frozen", [False, True], ids=["fresh-token", "frozen-token"])
def test_pool_signs_every_new_connection_across_token_expiry(
    emulator: Emulator, frozen: bool
) -> None:
    """A new pooled connection after the token expired works; a frozen password fails."""
    ep = endpoint_for(emulator)
    provider = TokenProvider(ep, clock=emulator.clock.monotonic)
    pool: psycopg2.pool.ThreadedConnectionPool
    if frozen:
        # What psycopg2 code usually does: one token baked into the pool's arguments.
        pool = psycopg2.pool.ThreadedConnectionPool(
            1, 2, **connect_params(ep), password=provider.token()
        )
    else:
        pool = iampg_psycopg2.ThreadedConnectionPool(1, 2, provider)
    try:
        first = pool.getconn()
        first_pid = _who(first)[1]
        emulator.clock.advance(901.0)
        if frozen:
            with pytest.raises(psycopg2.OperationalError, match="PAM authentication failed"):
                pool.getconn()
            return
        second = pool.getconn()  # the pool's one idle connection is taken: this one is new
        second_pid = _who(second)[1]
    finally:
        pool.closeall()
    assert first_pid != second_pid
    assert provider.stats().refreshes == 2


@pytest.mark.slow
def test_refused_token_is_forgotten_and_explained(emulator: Emulator) -> None:
    """A refused token is dropped; the error is both psycopg2's and iampg's, with causes."""
    # The provider's clock does not move with the emulator's: it keeps a token the server
    # considers expired, as a client with a skewed clock would.
    provider = TokenProvider(endpoint_for(emulator))
    provider.token()
    emulator.clock.advance(901.0)
    factory = iampg_psycopg2.connection_factory(provider)
    with pytest.raises(psycopg2.OperationalError) as info:
        psycopg2.connect("", connection_factory=factory)
    error: Exception = info.value
    assert isinstance(error, iampg.AuthenticationError)
    assert isinstance(error, iampg_psycopg2.AuthenticationError)
    assert 'PAM authentication failed for user "postgres"' in str(error)
    assert 'GRANT rds_iam TO "postgres"' in str(error)
    assert isinstance(error.__cause__, psycopg2.OperationalError)
    assert provider.stats().expires_in is None  # forgotten: the next connection signs anew
    conn = psycopg2.connect("", connection_factory=factory)
    try:
        assert _who(conn)[0] == "postgres"
    finally:
        conn.close()
    outcomes = [e.outcome for e in emulator.events]
    assert outcomes == ["rejected", "accepted"]


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["connect", "pool"])
def test_connect_and_pool_retry_once_with_a_new_token(emulator: Emulator, entry: str) -> None:
    """connect() and the pool forget a refused token and succeed with a new one at once."""
    provider = TokenProvider(endpoint_for(emulator))
    provider.token()
    emulator.clock.advance(901.0)
    if entry == "connect":
        conn = iampg_psycopg2.connect(provider)
        try:
            assert _who(conn)[0] == "postgres"
        finally:
            conn.close()
    else:
        pool = iampg_psycopg2.ThreadedConnectionPool(1, 1, provider)
        try:
            assert _who(pool.getconn())[0] == "postgres"
        finally:
            pool.closeall()
    assert [e.outcome for e in emulator.events] == ["rejected", "accepted"]
    assert provider.stats().refreshes == 2


def test_a_token_refused_twice_surfaces(emulator: Emulator) -> None:
    """When the new token is refused too, connect() raises the explained error."""
    signer = CountingSigner()  # its tokens are never valid
    provider = TokenProvider(endpoint_for(emulator), signer=signer)
    with pytest.raises(iampg.AuthenticationError, match="likely causes"):
        iampg_psycopg2.connect(provider)
    assert signer.calls == 2


def test_connection_factory_for_code_that_connects_itself(emulator: Emulator) -> None:
    """A factory subclassing DictConnection signs; the caller's DSN wins over the endpoint."""
    provider = TokenProvider(endpoint_for(emulator))
    factory = iampg_psycopg2.connection_factory(provider, base=psycopg2.extras.DictConnection)
    assert issubclass(factory, psycopg2.extras.DictConnection)
    conn: Any = psycopg2.connect("application_name=iampg-factory", connection_factory=factory)
    try:
        with conn.cursor() as cur:
            cur.execute("select current_setting('application_name') as name")
            assert cur.fetchone()["name"] == "iampg-factory"
    finally:
        conn.close()
    assert "X-Amz" not in repr(factory)


def test_no_tls_is_explained(emulator: Emulator) -> None:
    """sslmode=disable towards loopback is allowed, and the refusal says IAM needs TLS."""
    with pytest.raises(iampg_psycopg2.AuthenticationError, match="did not use TLS"):
        iampg_psycopg2.connect(endpoint_for(emulator), sslmode="disable")


def test_plaintext_to_a_remote_address_is_refused_before_signing() -> None:
    """A final sslmode=disable towards a non-loopback address is refused; no token is made."""
    signer = CountingSigner()
    # 0.0.0.0 is not loopback to the guard, yet a dial to it would never leave this machine.
    ep = Endpoint("mydb.cluster-abc.us-east-1.rds.amazonaws.com", user="app", hostaddr="0.0.0.0")
    provider = TokenProvider(ep, signer=signer)
    with pytest.raises(iampg.ConfigurationError, match=r"unencrypted to 0\.0\.0\.0"):
        iampg_psycopg2.connect(provider, sslmode="disable")
    factory = iampg_psycopg2.connection_factory(provider)
    with pytest.raises(iampg.ConfigurationError, match="unencrypted"):
        psycopg2.connect("sslmode=prefer", connection_factory=factory)
    assert signer.calls == 0


def test_another_host_than_the_signed_one_is_refused_before_signing(emulator: Emulator) -> None:
    """A final host, port or address other than the signed ones, or a password, is refused."""
    signer = CountingSigner()
    provider = TokenProvider(endpoint_for(emulator), signer=signer)
    with pytest.raises(iampg.ConfigurationError, match="signed for"):
        iampg_psycopg2.connect(provider, host="localhost")
    with pytest.raises(iampg.ConfigurationError, match="port="):
        iampg_psycopg2.connect(provider, port=5432)
    with pytest.raises(iampg.ConfigurationError, match="hostaddr="):
        iampg_psycopg2.connect(provider, hostaddr="127.0.0.2")
    with pytest.raises(iampg.ConfigurationError, match="password"):
        iampg_psycopg2.connect(provider, password="sentinel-pw-7c1e9d")
    factory = iampg_psycopg2.connection_factory(provider)
    with pytest.raises(iampg.ConfigurationError, match="signed for"):
        psycopg2.connect("host=db.example.com", connection_factory=factory)
    with pytest.raises(iampg.ConfigurationError, match="signed for"):
        iampg_psycopg2.ThreadedConnectionPool(1, 1, provider, host="127.0.0.1")
    assert signer.calls == 0
    assert emulator.events == []


@pytest.mark.slow
def test_connect_waits_out_a_serverless_resume(backend: Backend) -> None:
    """With the serverless preset, connect() retries past connect timeouts during a resume."""
    with paused_serverless(backend, resume_delay=3.0) as emu:
        conn = iampg_psycopg2.connect(
            endpoint_for(emu, connect_timeout="1"), preset="aurora-serverless", wait=20
        )
        try:
            assert _who(conn)[0] == "postgres"
        finally:
            conn.close()
        assert emu.state == "running"


@pytest.mark.slow
def test_a_resume_longer_than_wait_is_unavailable_for_both_hierarchies(backend: Backend) -> None:
    """Past wait=, the error is both psycopg2.OperationalError and iampg.UnavailableError."""
    with (
        paused_serverless(backend, resume_delay=60.0) as emu,
        pytest.raises(psycopg2.OperationalError) as caught,
    ):
        iampg_psycopg2.connect(
            endpoint_for(emu, connect_timeout="1"), preset="aurora-serverless", wait=2
        )
    error: Exception = caught.value
    assert isinstance(error, iampg.UnavailableError)
    assert "wait=" in str(error)


class Increment:
    """Read the counter and write it back plus one; the first run is raced by a commit."""

    def __init__(self, counter: ContendedCounter) -> None:
        self.counter = counter
        self.calls = 0

    def __call__(self, conn: Any) -> int:
        self.calls += 1
        with conn.cursor() as cur:
            cur.execute("set transaction isolation level repeatable read")
            cur.execute("select n from iampg_retry_psycopg2 where id = 1")
            n = int(cur.fetchone()[0])
            if self.calls == 1:  # another transaction commits in between: ours must conflict
                self.counter.bump_elsewhere()
            cur.execute("update iampg_retry_psycopg2 set n = %s where id = 1", (n + 1,))
        return n + 1


@pytest.mark.parametrize("kind", ["pool", "connection", "decorator"])
def test_retry_transaction_runs_a_conflict_again(emulator: Emulator, kind: str) -> None:
    """psycopg2's real 40001 (its pgcode) rolls back and the work runs again."""
    counter = ContendedCounter(endpoint_for(emulator), "iampg_retry_psycopg2")
    provider = TokenProvider(counter.endpoint)
    work = Increment(counter)
    pool = iampg_psycopg2.ThreadedConnectionPool(1, 2, provider)
    conn = pool.getconn()
    try:
        if kind == "pool":
            result = iampg_psycopg2.retry_transaction(pool, work, base=0.001, cap=0.01)
        elif kind == "connection":
            result = iampg_psycopg2.retry_transaction(conn, work, base=0.001, cap=0.01)
        else:

            @iampg_psycopg2.retry_transaction(pool, base=0.001, cap=0.01)
            def increment_by(c: Any, extra: int) -> int:
                return work(c) + extra

            result = increment_by(0)
    finally:
        pool.putconn(conn)
        pool.closeall()
    assert result == 101
    assert work.calls == 2
    assert counter.value() == 101


def test_retry_transaction_gives_up_after_attempts(emulator: Emulator) -> None:
    """DSQL's OC000 (raised here by PL/pgSQL) is retried until attempts run out."""
    calls = 0

    def conflict(conn: Any) -> None:
        nonlocal calls
        calls += 1
        with conn.cursor() as cur:
            cur.execute("do $$ begin raise exception 'x' using errcode = 'OC000'; end $$")

    conn = iampg_psycopg2.connect(endpoint_for(emulator))
    try:
        with pytest.raises(psycopg2.Error) as info:
            iampg_psycopg2.retry_transaction(conn, conflict, attempts=3, base=0.001, cap=0.01)
    finally:
        conn.close()
    assert info.value.pgcode == "OC000"
    assert calls == 3


@pytest.mark.parametrize("cut", ["terminated", "abrupt"])
def test_pool_replaces_a_connection_lost_before_commit(emulator: Emulator, cut: str) -> None:
    """A pooled connection terminated (57P01) or cut without a word is replaced; fn reruns."""
    ep = endpoint_for(emulator)
    pids: list[int] = []

    def work(conn: Any) -> int:
        with conn.cursor() as cur:
            cur.execute("select pg_backend_pid()")
            pids.append(int(cur.fetchone()[0]))
            if len(pids) == 1:
                if cut == "terminated":
                    terminate_backend(ep, pids[0])
                else:
                    emulator.pause()
                    emulator.resume()
            cur.execute("select 7")
            return int(cur.fetchone()[0])

    pool = iampg_psycopg2.ThreadedConnectionPool(1, 1, ep)
    try:
        assert iampg_psycopg2.retry_transaction(pool, work, base=0.001, cap=0.01) == 7
    finally:
        pool.closeall()
    assert len(pids) == 2
    assert pids[0] != pids[1]


def test_own_connection_lost_is_raised(emulator: Emulator) -> None:
    """A caller's own connection cannot be replaced: its loss surfaces on the first attempt."""
    ep = endpoint_for(emulator)
    calls = 0

    def work(conn: Any) -> None:
        nonlocal calls
        calls += 1
        with conn.cursor() as cur:
            cur.execute("select pg_backend_pid()")
            terminate_backend(ep, int(cur.fetchone()[0]))
            cur.execute("select 1")

    conn = iampg_psycopg2.connect(ep)
    try:
        with pytest.raises(psycopg2.Error):
            iampg_psycopg2.retry_transaction(conn, work, base=0.001)
    finally:
        conn.close()
    assert calls == 1


def test_retry_transaction_refuses_other_targets(emulator: Emulator) -> None:
    """Something that is neither a psycopg2 pool nor a connection is a configuration error."""
    with pytest.raises(iampg.ConfigurationError, match="psycopg2 pool or connection"):
        iampg_psycopg2.retry_transaction(endpoint_for(emulator), lambda conn: None)
