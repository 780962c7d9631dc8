"""Tokens signed with short-lived credentials: validity capped, refreshed, honoured end to end."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest

import iampg
from iampg import TokenProvider
from iampg.emulator import CredentialsServer, CredentialStore, Emulator
from support import EmulatorFactory, endpoint_for, use_credentials_server

ROLE = "arn:aws:iam::123456789012:role/app"
LIFETIME = 120.0  # emulated seconds the container credentials live: well under 15 minutes
BUFFER = 30.0


# Keep botocore's DEBUG lines (which show signatures) out of failure reports.
pytestmark = pytest.mark.usefixtures("quiet_botocore")


@pytest.fixture
def emu(start_emulator: EmulatorFactory) -> Emulator:
    """Return an emulator on real time whose known keys live in a shared store."""
    return start_emulator(credentials=CredentialStore())


@pytest.fixture
def container(emu: Emulator, monkeypatch: pytest.MonkeyPatch) -> Iterator[CredentialsServer]:
    """Serve 120-second keys and point botocore's default chain at them (no static keys)."""
    with CredentialsServer.for_emulator(emu, lifetime=LIFETIME) as server:
        use_credentials_server(monkeypatch, server)
        yield server


class Token(str):
    """A token that shows as ``<token>`` in reprs, so assertion reports never print it."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<token>"


def key_of(token: str) -> str:
    """Return the access key id a token was signed with (never the token itself)."""
    return parse_qs(urlsplit("//" + token).query)["X-Amz-Credential"][0].split("/")[0]


def logs_in(emu: Emulator, token: str) -> bool:
    """Tell whether a raw psycopg connection with this exact token is accepted."""
    try:
        with psycopg.connect(emu.conninfo("postgres", password=token), connect_timeout=5):
            return True
    except psycopg.OperationalError:
        return False


def test_validity_is_capped_by_the_credentials_expiry(
    emu: Emulator, container: CredentialsServer
) -> None:
    """With 120 s credentials the token counts as valid 120 s, refreshed 30 s before."""
    provider = TokenProvider(endpoint_for(emu), refresh_buffer=BUFFER, clock=emu.clock.monotonic)
    token = Token(provider.token())
    stats = provider.stats()
    assert stats.expires_in is not None
    assert stats.refresh_in is not None
    assert LIFETIME - 5 < stats.expires_in <= LIFETIME  # not the token's own 900 s
    assert stats.refresh_in == pytest.approx(stats.expires_in - BUFFER)
    assert key_of(token).startswith("ASIAEXAMPLE")
    with iampg.connect(provider=provider) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


@pytest.mark.slow
def test_refreshes_before_expiry_and_keeps_working_across_rotations(
    emu: Emulator, container: CredentialsServer
) -> None:
    """A pool keeps connecting through three rotations; a token kept too long is refused."""
    provider = TokenProvider(endpoint_for(emu), refresh_buffer=BUFFER, clock=emu.clock.monotonic)
    keys = []
    with iampg.ConnectionPool(
        provider=provider, min_size=1, max_size=2, timeout=5.0, open=False
    ) as pool:
        with pool.connection() as conn:
            assert conn.execute("select 1").fetchone() == (1,)
        for _ in range(3):
            previous = Token(provider.token())
            keys.append(key_of(previous))
            due_in = provider.stats().refresh_in
            assert due_in is not None
            emu.clock.advance(due_in + 5)  # due, and its keys have BUFFER - 5 s left
            fresh = Token(provider.token())
            assert key_of(fresh) != key_of(previous)  # refreshed before the keys expired
            assert logs_in(emu, previous)  # the old keys still work: nothing was late
            pool.drain()  # every new connection needs a token now
            with pool.connection() as conn:
                assert conn.execute("select 2").fetchone() == (2,)
            emu.clock.advance(BUFFER)  # now the previous keys have expired
            assert not logs_in(emu, previous)
            assert emu.events[-1].reason == "credentials expired"
            with iampg.connect(provider=provider) as conn:
                assert conn.execute("select 3").fetchone() == (3,)
        assert pool.get_stats().get("connections_errors", 0) == 0
    assert len(set(keys)) == 3
    assert provider.stats().refreshes >= 4
    assert container.stats().issued >= 4


@pytest.mark.slow
def test_assumed_role_credentials_refresh_themselves(emu: Emulator) -> None:
    """Role credentials from AssumeRole are renewed by a second call; tokens keep working."""
    with CredentialsServer.for_emulator(emu, external_ids={ROLE: "ext-1"}) as sts:
        provider = TokenProvider(
            endpoint_for(emu),
            role_arn=ROLE,
            external_id="ext-1",
            role_duration=900,
            sts_endpoint_url=sts.url,
            refresh_buffer=60,
            clock=emu.clock.monotonic,
        )
        first = Token(provider.token())
        stats = provider.stats()
        assert stats.expires_in is not None
        assert stats.expires_in <= 900
        with iampg.connect(provider=provider) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
        calls = sts.assume_role_calls
        assert calls
        assert {
            (c.role_arn, c.external_id, c.duration_seconds, c.source_access_key_id, c.error)
            for c in calls
        } == {(ROLE, "ext-1", 900, "AKIAIOSFODNN7EXAMPLE", None)}
        assert key_of(first) == calls[-1].access_key_id
        emu.clock.advance(850)  # the token is due; its role session ends in 50 s
        second = Token(provider.token())
        assert len(sts.assume_role_calls) > len(calls)  # a new AssumeRole, not a cached one
        assert key_of(second) == sts.assume_role_calls[-1].access_key_id != key_of(first)
        emu.clock.advance(100)  # the first role session has ended
        assert not logs_in(emu, first)
        assert emu.events[-1].reason == "credentials expired"
        with iampg.connect(provider=provider) as conn:
            assert conn.execute("select 2").fetchone() == (2,)
        assert logs_in(emu, second)


def test_role_arn_on_the_provider_with_the_sts_endpoint_from_the_environment(
    emu: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TokenProvider(role_arn=...) reaches a local STS through AWS_ENDPOINT_URL_STS."""
    with CredentialsServer.for_emulator(emu, external_ids={ROLE: "ext-1"}) as sts:
        monkeypatch.setenv("AWS_ENDPOINT_URL_STS", sts.url)
        provider = TokenProvider(
            endpoint_for(emu), role_arn=ROLE, external_id="ext-1", role_duration=900
        )
        with iampg.connect(provider=provider) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
        assert sts.assume_role_calls[-1].role_session_name == "iampg"
        wrong = TokenProvider(
            endpoint_for(emu), role_arn=ROLE, external_id="wrong", role_duration=900
        )
        with pytest.raises(iampg.TokenError, match="not allowed to assume the role"):
            wrong.token()
        assert sts.assume_role_calls[-1].error == "AccessDenied"
