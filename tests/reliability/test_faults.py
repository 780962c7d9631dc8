"""Faults the real services and machines produce, each with the error an application sees."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import psycopg
import pytest

import iampg
from iampg import Endpoint, TokenProvider
from iampg.emulator import Backend, CredentialsServer, CredentialStore, Emulator, EmulatorClock
from support import EmulatorFactory, endpoint_for, paused_serverless, use_credentials_server

SKEW = 600.0  # seconds: the local clock is ten minutes off
HANG_BOUND = 30.0  # real seconds a hung credentials server may hold a caller, at most


# Keep botocore's DEBUG lines (which show signatures) out of failure reports.
pytestmark = pytest.mark.usefixtures("quiet_botocore")


@pytest.fixture
def emu(start_emulator: EmulatorFactory) -> Emulator:
    """Return an emulator on real time whose known keys live in a shared store."""
    return start_emulator(credentials=CredentialStore())


@pytest.fixture
def container(emu: Emulator, monkeypatch: pytest.MonkeyPatch) -> Iterator[CredentialsServer]:
    """Point botocore's default chain at a credentials server (no static keys)."""
    with CredentialsServer.for_emulator(emu, hang_seconds=HANG_BOUND) as server:
        use_credentials_server(monkeypatch, server)
        yield server


def free_port() -> int:
    """Return a loopback TCP port nothing listens on (just released by the kernel)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def rejections(emu: Emulator) -> list[str]:
    """Return the reasons of the emulator's refused connections, oldest first."""
    return [event.reason for event in emu.events if event.outcome == "rejected"]


# --- credentials ---


@pytest.mark.slow
def test_credentials_server_error_raises_token_error(container: CredentialsServer) -> None:
    """A credentials endpoint answering 500 surfaces as iampg.TokenError naming credentials."""
    container.inject("error")
    provider = TokenProvider(endpoint_for(container_emulator(container)))
    with pytest.raises(iampg.TokenError) as caught:
        iampg.connect(provider=provider)
    assert "credential" in str(caught.value).lower()
    assert provider.stats().refreshes == 0


@pytest.mark.slow
def test_credentials_server_hang_is_bounded(container: CredentialsServer) -> None:
    """A hung credentials endpoint fails the connect with TokenError within a bounded time."""
    container.inject("hang")
    provider = TokenProvider(endpoint_for(container_emulator(container)))
    started = time.monotonic()
    with pytest.raises(iampg.TokenError) as caught:
        iampg.connect(provider=provider)
    assert time.monotonic() - started < HANG_BOUND  # botocore's own timeouts, not the hang
    assert "credential" in str(caught.value).lower()


def test_credentials_already_expired_raise_token_error(container: CredentialsServer) -> None:
    """Keys that are expired on arrival give TokenError, never a token the server refuses."""
    container.inject("expired")
    emu = container_emulator(container)
    provider = TokenProvider(endpoint_for(emu))
    with pytest.raises(iampg.TokenError) as caught:
        iampg.connect(provider=provider)
    assert "expired" in str(caught.value).lower()
    assert rejections(emu) == []  # nothing was sent to the database


@pytest.mark.slow
def test_one_credentials_error_is_absorbed(container: CredentialsServer) -> None:
    """A single 500 from the credentials endpoint is retried by botocore: the connect works."""
    container.inject("error", count=1)
    provider = TokenProvider(endpoint_for(container_emulator(container)))
    with iampg.connect(provider=provider) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert container.stats().faults == 1


_EMULATORS: dict[int, Emulator] = {}


def container_emulator(server: CredentialsServer) -> Emulator:
    """Return the emulator the ``container`` fixture's server issues keys for."""
    return _EMULATORS[id(server)]


@pytest.fixture(autouse=True)
def _register(request: pytest.FixtureRequest) -> Iterator[None]:
    """Remember which emulator a test's credentials server belongs to."""
    if "container" in request.fixturenames:
        server = request.getfixturevalue("container")
        _EMULATORS[id(server)] = request.getfixturevalue("emu")
    yield
    _EMULATORS.clear()


# --- network and names ---


def test_dns_failure_names_the_host() -> None:
    """An unresolvable host name gives psycopg's OperationalError naming it, not an auth error."""
    endpoint = Endpoint("db.cluster-abc.us-east-1.rds.invalid", region="us-east-1", user="app")
    provider = TokenProvider(endpoint)
    with pytest.raises(psycopg.OperationalError) as caught:
        iampg.connect(provider=provider, wait=0)
    assert not isinstance(caught.value, iampg.AuthenticationError)
    text = str(caught.value)
    # Newer psycopg names the host; 3.2.4 (the declared minimum) gives the resolver's words.
    assert ("rds.invalid" in text and "failed to resolve host" in text) or (
        "Name or service not known" in text
    )


@pytest.mark.slow
def test_backend_down_and_back(backend: Backend) -> None:
    """With the database down the connect fails with an OperationalError; once up, it works."""
    port = free_port()
    with Emulator(f"host=127.0.0.1 port={port} user=postgres dbname=postgres") as emu:
        provider = TokenProvider(endpoint_for(emu))
        with pytest.raises(psycopg.OperationalError) as caught:
            iampg.connect(provider=provider, wait=0)
        assert not isinstance(caught.value, iampg.AuthenticationError)
        try:
            temporary = Backend.temporary(port=port)
        except iampg.ConfigurationError as exc:  # no PostgreSQL binaries on this machine
            pytest.skip(f"cannot start a throwaway PostgreSQL: {exc}")
        try:
            temporary.ensure_role("postgres", iam=True)  # as on RDS: IAM logins need rds_iam
            with iampg.connect(provider=provider, wait=0) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
        finally:
            temporary.stop()
        with pytest.raises(psycopg.OperationalError):
            iampg.connect(provider=provider, wait=0)
        assert provider.stats().refreshes == 1  # the token outlived the outage


# --- clocks ---


def test_local_clock_behind_ten_minutes_still_connects(backend: Backend) -> None:
    """A local clock 10 min behind stays within a fresh token's 15 minutes: it connects."""
    with Emulator(backend.dsn) as emu:
        emu.clock.advance(SKEW)  # the service is 10 minutes ahead of this machine
        with iampg.connect(endpoint_for(emu)) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)


def test_local_clock_ahead_ten_minutes_names_the_clock(backend: Backend) -> None:
    """A local clock 10 min ahead dates tokens in the future: the error names the local clock."""
    behind = EmulatorClock(wall=lambda: time.time() - SKEW)
    with Emulator(backend.dsn, clock=behind) as emu:
        with pytest.raises(iampg.AuthenticationError) as caught:
            iampg.connect(endpoint_for(emu))
        assert rejections(emu)[-1] == "token not yet valid"
    message = str(caught.value)
    assert "PAM authentication failed" in message
    assert "local clock" in message


def test_local_clock_skew_is_named_as_skew(backend: Backend) -> None:
    """The error for a skewed clock names clock skew among its likely causes."""
    behind = EmulatorClock(wall=lambda: time.time() - SKEW)
    with Emulator(backend.dsn, clock=behind) as emu, pytest.raises(iampg.AuthenticationError) as e:
        iampg.connect(endpoint_for(emu))
    assert "clock skew" in str(e.value).lower()


# --- serverless cold start ---


@pytest.mark.slow
def test_cold_start_longer_than_connect_timeout_without_wait(backend: Backend) -> None:
    """A resume longer than connect_timeout, with wait=0, fails as psycopg's timeout."""
    with paused_serverless(backend, resume_delay=30.0) as emu:
        with pytest.raises(psycopg.OperationalError) as caught:
            iampg.connect(endpoint_for(emu, connect_timeout="1"), wait=0)
        assert "timeout expired" in str(caught.value)
        assert emu.state == "resuming"


@pytest.mark.slow
def test_cold_start_longer_than_connect_timeout_with_wait(backend: Backend) -> None:
    """With the serverless profile and a long wait=, connect retries past timeouts and works."""
    with paused_serverless(backend, resume_delay=3.0) as emu:
        with iampg.connect(
            endpoint_for(emu, connect_timeout="1"), preset="aurora-serverless", wait=20
        ) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert emu.state == "running"


@pytest.mark.slow
def test_cold_start_longer_than_wait_says_to_wait_longer(backend: Backend) -> None:
    """A resume longer than wait= gives UnavailableError telling to pass a longer wait=."""
    with (
        paused_serverless(backend, resume_delay=60.0) as emu,
        pytest.raises(iampg.UnavailableError) as caught,
    ):
        iampg.connect(endpoint_for(emu, connect_timeout="1"), preset="aurora-serverless", wait=2)
    assert "wait=" in str(caught.value)
    assert isinstance(caught.value.__cause__, psycopg.OperationalError)


# --- TLS ---


def test_certificate_for_another_host_is_refused_before_the_token(emu: Emulator) -> None:
    """Under verify-full a certificate for another name fails in TLS; no token reaches it."""
    endpoint = endpoint_for(emu).replace(host="impostor.cluster-abc.us-east-1.rds.amazonaws.com")
    with pytest.raises(psycopg.OperationalError) as caught:
        iampg.connect(endpoint, wait=0)
    assert not isinstance(caught.value, iampg.AuthenticationError)
    assert "does not match host name" in str(caught.value)
    assert all(event.outcome != "rejected" for event in emu.events)


def test_sslmode_disable_to_a_remote_host_is_refused_before_signing() -> None:
    """sslmode=disable towards a non-loopback host raises ConfigurationError; nothing signed."""
    endpoint = Endpoint("db.cluster-abc.us-east-1.rds.amazonaws.com", user="app", sslmode="disable")
    provider = TokenProvider(endpoint)
    with pytest.raises(iampg.ConfigurationError) as caught:
        iampg.connect(provider=provider)
    assert "sslmode=disable" in str(caught.value)
    assert "verify-full" in str(caught.value)
    stats = provider.stats()
    assert (stats.refreshes, stats.misses, stats.failures) == (0, 0, 0)
