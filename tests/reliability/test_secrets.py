"""No secret leaves: tokens, signatures and passwords stay out of logs, reprs and errors."""

from __future__ import annotations

import contextlib
import io
import logging
import time

import psycopg
import pytest

import iampg
from iampg import TokenProvider, cli
from iampg.emulator import Backend, Emulator, EmulatorClock
from secret_guard import SENTINEL_PASSWORD, SecretGuard, secrets_of
from support import endpoint_for


def test_guard_catches_a_planted_leak() -> None:
    """The guard reports a token logged, without quoting it: the check can fail."""
    guard = SecretGuard()
    token = "host:5432/?Action=connect&X-Amz-Signature=" + "ab" * 32
    guard.secrets.update(secrets_of(token))
    logging.getLogger("planted").addHandler(guard.recorder)
    try:
        logging.getLogger("planted").warning("signature %s", "ab" * 32)
    finally:
        logging.getLogger("planted").removeHandler(guard.recorder)
    leaks = guard.leaks()
    assert leaks == [leaks[0]]
    assert "planted" in leaks[0]
    assert "ab" * 32 not in leaks[0]


def test_guard_sees_the_tokens_of_a_connect(emulator: Emulator, secret_guard: SecretGuard) -> None:
    """A connect through a provider is recorded: the guard knows the token and its signature."""
    provider = TokenProvider(endpoint_for(emulator))
    with iampg.connect(provider=provider) as conn:
        conn.execute("SELECT 1")
    assert len(secret_guard.secrets) >= 3  # the sentinel, the token, its signature
    assert not secret_guard.leaks()
    assert not secret_guard.leaks_in(repr(provider))


def test_refused_token_error_does_not_quote_it(backend: Backend, secret_guard: SecretGuard) -> None:
    """A token refused (expired on the server's clock) raises AuthenticationError without it."""
    ahead = EmulatorClock(wall=lambda: time.time() + 1000.0)  # every token looks too old
    with (
        Emulator(backend.dsn, clock=ahead) as emu,
        pytest.raises(iampg.AuthenticationError) as caught,
    ):
        iampg.connect(endpoint_for(emu))
    assert len(secret_guard.secrets) >= 3  # the refused tokens are known to the guard
    assert not secret_guard.leaks_in(str(caught.value))
    assert not secret_guard.leaks_in(repr(caught.value))


def test_sentinel_password_refused_stays_out_of_logs(
    emulator: Emulator, secret_guard: SecretGuard
) -> None:
    """A wrong password sent to the gateway is not in its logs, events or the client's error."""
    with pytest.raises(psycopg.OperationalError) as caught:
        psycopg.connect(emulator.conninfo("postgres", password=SENTINEL_PASSWORD)).close()
    assert SENTINEL_PASSWORD not in str(caught.value)
    assert all(SENTINEL_PASSWORD not in repr(event) for event in emulator.events)
    assert any(event.outcome == "rejected" for event in emulator.events)
    assert not secret_guard.leaks()


def test_pool_lifecycle_leaks_nothing(emulator: Emulator, secret_guard: SecretGuard) -> None:
    """A pool opening, using and closing connections logs no token at DEBUG."""
    provider = TokenProvider(endpoint_for(emulator))
    with iampg.ConnectionPool(provider=provider, min_size=2, max_size=3, open=True) as pool:
        with pool.connection() as conn:
            conn.execute("SELECT 1")
        assert not secret_guard.leaks_in(repr(pool))
    assert len(secret_guard.recorder.records) > 0
    assert not secret_guard.leaks()


def test_cli_errors_do_not_show_the_token(emulator: Emulator, secret_guard: SecretGuard) -> None:
    """`iampg token` prints the token on stdout only; stderr and the logs do not carry it."""
    out, err = io.StringIO(), io.StringIO()
    argv = ["token", emulator.host, "--port", str(emulator.port), "--user", "postgres"]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert cli.main([*argv, "--region", emulator.region]) == 0
    token = out.getvalue().strip()
    assert token
    secret_guard.secrets.update(secrets_of(token))
    assert not secret_guard.leaks_in(err.getvalue())
    assert not secret_guard.leaks()


def test_backend_password_stays_out_of_reprs(backend: Backend, secret_guard: SecretGuard) -> None:
    """An emulator whose backend DSN carries a password does not show it in repr or logs."""
    dsn = backend.dsn + f" password={SENTINEL_PASSWORD}"
    with Emulator(dsn) as emu:
        assert SENTINEL_PASSWORD not in repr(emu)
        with iampg.connect(endpoint_for(emu)) as conn:
            conn.execute("SELECT 1")
    assert not secret_guard.leaks()
