"""No secret leaves: tokens, signatures and passwords stay out of logs, reprs and errors."""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
import time
from collections.abc import Iterator

import psycopg
import pytest

import iampg
from iampg import TokenProvider, cli
from iampg.emulator import Backend, CredentialsServer, CredentialStore, Emulator, EmulatorClock
from secret_guard import PRINTS_TOKEN, SENTINEL_PASSWORD, SecretGuard, secrets_of
from support import endpoint_for, use_credentials_server

ROLE = "arn:aws:iam::123456789012:role/app"


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


def test_guard_catches_a_token_printed_by_a_command() -> None:
    """Command output is checked: stderr never, stdout only for token, url and env."""
    guard = SecretGuard()
    token = "host:5432/?Action=connect&X-Amz-Signature=" + "cd" * 32
    guard.secrets.update(secrets_of(token))
    for command in PRINTS_TOKEN:
        guard.check_command(command, stdout=token, stderr="")
    assert guard.leaks() == []
    guard.check_command("token", stdout="", stderr="cd" * 32)
    guard.check_command("doctor", stdout=token, stderr="")
    assert guard.leaks() == ["stderr of iampg token", "stdout of iampg doctor"]


def test_guard_watches_the_real_command_runner(
    emulator: Emulator, secret_guard: SecretGuard
) -> None:
    """A command that wrote a minted token to stderr is reported by the suite's guard."""
    provider = TokenProvider(endpoint_for(emulator))

    def leaky(args: argparse.Namespace, out: object) -> int:
        del args, out
        sys.stderr.write(provider.token() + "\n")
        return 0

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert cli._run(leaky, argparse.Namespace(command="leaky")) == 0
    assert secret_guard.leaks_in(err.getvalue())  # passed on to the test, as written
    assert secret_guard.output_leaks == ["stderr of iampg leaky"]
    secret_guard.output_leaks.clear()  # planted: don't fail this test for it


def _common(emu: Emulator) -> list[str]:
    return [emu.host, "--port", str(emu.port), "--user", "postgres", "--region", emu.region]


def test_commands_keep_the_token_to_their_own_stdout(
    emulator: Emulator, secret_guard: SecretGuard
) -> None:
    """token, url and env print the token on stdout; doctor and errors print it nowhere."""
    printed: dict[str, str] = {}
    for command in ("token", "url", "env"):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            assert cli.main([command, *_common(emulator)]) == 0
        printed[command] = out.getvalue()
        assert err.getvalue() == ""
    assert secret_guard.leaks_in(printed["token"])
    assert secret_guard.leaks_in(printed["env"])  # PGPASSWORD=<token>
    assert "X-Amz-Signature%3D" in printed["url"]  # the token, percent-encoded
    doctor = [
        "doctor",
        *_common(emulator),
        "--hostaddr",
        emulator.listen_host,
        "--sslrootcert",
        str(emulator.ca_file),
        "--sslmode",
        "verify-full",
    ]
    for argv in (doctor, [*doctor[:-1], "disable"]):  # passing, then refused without TLS
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli.main(argv)
        assert out.getvalue()
        assert not secret_guard.leaks_in(out.getvalue() + err.getvalue())
    assert len(secret_guard.secrets) >= 3
    assert not secret_guard.leaks()


def test_backend_password_stays_out_of_reprs(backend: Backend, secret_guard: SecretGuard) -> None:
    """An emulator whose backend DSN carries a password does not show it in repr or logs."""
    dsn = backend.dsn + f" password={SENTINEL_PASSWORD}"
    with Emulator(dsn) as emu:
        assert SENTINEL_PASSWORD not in repr(emu)
        with iampg.connect(endpoint_for(emu)) as conn:
            conn.execute("SELECT 1")
    assert not secret_guard.leaks()


@pytest.fixture
def every_logger_at_debug() -> Iterator[None]:
    """Set every logger that exists (botocore's and urllib3's included) and the root to DEBUG."""
    import botocore.session  # the modules whose loggers matter exist before the levels are set

    botocore.session.Session().create_client("sts", region_name="us-east-1")
    names = [None, *logging.root.manager.loggerDict]
    levels = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


@pytest.mark.usefixtures("every_logger_at_debug")
@pytest.mark.parametrize("source", ["assumed role", "container", "container, then role"])
def test_fetched_credentials_stay_out_of_debug_logs(
    backend: Backend,
    secret_guard: SecretGuard,
    monkeypatch: pytest.MonkeyPatch,
    source: str,
) -> None:
    """Credentials from AssumeRole or a container endpoint are in no log record at DEBUG."""
    with (
        Emulator(backend.dsn, credentials=CredentialStore()) as emu,
        CredentialsServer.for_emulator(emu) as server,
    ):
        options: dict[str, str] = {}
        if source != "assumed role":
            use_credentials_server(monkeypatch, server)
            secret_guard.add_secret(server.env()["AWS_CONTAINER_AUTHORIZATION_TOKEN"])
        if source != "container":
            options = {"role_arn": ROLE, "sts_endpoint_url": server.url}
        provider = TokenProvider(endpoint_for(emu), **options)  # type: ignore[arg-type]
        with iampg.connect(provider=provider) as conn:
            conn.execute("SELECT 1")
        issued = server.issued
    assert issued
    assert bool(server.assume_role_calls) is (source != "container")
    for credentials in issued:
        secret_guard.add_secret(credentials.secret_access_key)
        secret_guard.add_secret(credentials.session_token or credentials.secret_access_key)
    botocore_records = [r for r in secret_guard.recorder.records if r.name.startswith("botocore")]
    assert len(botocore_records) > 10  # botocore did log at DEBUG: the check has material
    assert not secret_guard.leaks()
