"""The guard on what libpq receives: every entry point checks its final, merged parameters.

Refusals use AWS host names (nothing to dial on this machine) and a counting signer: each is
refused before a token is signed and before any network I/O. Allowed cases go through the
emulator.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Mapping
from typing import Any

import psycopg_pool
import pytest

import iampg
from fakes import CountingSigner
from iampg import Endpoint, TokenProvider
from iampg.cli import main
from iampg.emulator import Emulator
from support import endpoint_for

HOST = "mydb.cluster-abc.us-east-1.rds.amazonaws.com"
AWS = Endpoint(HOST, user="app", connect_timeout="1")

# Caller arguments that must never reach libpq for AWS, each with the words of its refusal.
REFUSED: list[tuple[dict[str, Any], str]] = [
    ({"sslmode": "disable"}, "unencrypted"),
    ({"sslmode": "prefer"}, "unencrypted"),
    ({"sslmode": None}, "unencrypted"),  # None drops it: libpq's default is prefer
    ({"host": "evil.example.com"}, "use another Endpoint"),
    ({"hostaddr": "127.0.0.1"}, "use another Endpoint"),
    ({"port": 6432}, "use another Endpoint"),
    ({"conninfo": "hostaddr=127.0.0.9"}, "use another Endpoint"),
    ({"password": "sentinel-pw-7c1e9d"}, "remove password"),
    ({"service": "mydb"}, "service"),
]
IDS = ["disable", "prefer", "no-sslmode", "host", "hostaddr", "port", "conninfo", "pw", "service"]


def _provider(endpoint: Endpoint = AWS) -> tuple[TokenProvider, CountingSigner]:
    signer = CountingSigner()
    return TokenProvider(endpoint, signer=signer), signer


@pytest.mark.parametrize(("extra", "words"), REFUSED, ids=IDS)
def test_connect_checks_its_keyword_arguments(extra: dict[str, Any], words: str) -> None:
    """connect(**kwargs) that would send the token elsewhere or in plaintext is refused."""
    provider, signer = _provider()
    with pytest.raises(iampg.ConfigurationError, match=words):
        iampg.connect(provider=provider, **extra)
    assert signer.calls == 0


@pytest.mark.parametrize(("extra", "words"), REFUSED, ids=IDS)
def test_aconnect_checks_its_keyword_arguments(extra: dict[str, Any], words: str) -> None:
    """aconnect(**kwargs) is checked like connect()."""
    provider, signer = _provider()
    with pytest.raises(iampg.ConfigurationError, match=words):
        asyncio.run(iampg.aconnect(provider=provider, **extra))
    assert signer.calls == 0


def test_connect_allows_matching_overrides_and_loopback_plaintext(emulator: Emulator) -> None:
    """Arguments that keep the signed host, address and port connect through the emulator."""
    ep = endpoint_for(emulator)
    with iampg.connect(
        ep, host=ep.host, hostaddr=emulator.listen_host, port=str(ep.port), application_name="g"
    ) as conn:
        assert conn.execute("select current_setting('application_name')").fetchone() == ("g",)
    # Loopback may go without TLS (the emulator then refuses like RDS, for lack of TLS).
    with pytest.raises(iampg.AuthenticationError, match="did not use TLS"):
        iampg.connect(ep, sslmode="disable")


@pytest.mark.parametrize(("extra", "words"), REFUSED, ids=IDS)
def test_pool_checks_a_kwargs_mapping_at_construction(extra: dict[str, Any], words: str) -> None:
    """ConnectionPool(kwargs={...}) that would redirect the token is refused at once."""
    provider, signer = _provider()
    with pytest.raises(iampg.ConfigurationError, match=words):
        iampg.ConnectionPool(provider=provider, kwargs=extra, open=False)
    with pytest.raises(iampg.ConfigurationError, match=words):
        iampg.AsyncConnectionPool(provider=provider, kwargs=extra)
    assert signer.calls == 0


def _refused_in_pool_log(caplog: pytest.LogCaptureFixture, words: str) -> bool:
    return any(
        r.name == "psycopg.pool" and words in r.getMessage() and "error connecting" in r.msg
        for r in caplog.records
    )


@pytest.mark.slow
def test_pool_checks_a_kwargs_callable_at_each_attempt(caplog: pytest.LogCaptureFixture) -> None:
    """A kwargs callable's result is checked per connection attempt, before any signing."""
    provider, signer = _provider()
    calls: list[int] = []

    def kwargs() -> Mapping[str, Any]:
        calls.append(1)
        return {"sslmode": "disable"}

    with (
        iampg.ConnectionPool(
            provider=provider, kwargs=kwargs, min_size=0, max_size=1, timeout=1.0, open=False
        ) as pool,
        pytest.raises(psycopg_pool.PoolTimeout),
        pool.connection(),
    ):
        pass
    assert calls
    assert signer.calls == 0
    assert _refused_in_pool_log(caplog, "unencrypted")


@pytest.mark.slow
@pytest.mark.parametrize("flavour", ["sync-callable", "async-callable"])
def test_async_pool_checks_a_kwargs_callable_at_each_attempt(
    caplog: pytest.LogCaptureFixture, flavour: str
) -> None:
    """The async pool checks what a sync or async kwargs callable returns, per attempt."""
    provider, signer = _provider()

    def plain() -> Mapping[str, Any]:
        return {"host": "evil.example.com"}

    async def coroutine() -> Mapping[str, Any]:
        return plain()

    kwargs: Callable[[], Any] = plain if flavour == "sync-callable" else coroutine

    async def main() -> None:
        async with iampg.AsyncConnectionPool(
            provider=provider, kwargs=kwargs, min_size=0, max_size=1, timeout=1.0
        ) as pool:
            with pytest.raises(psycopg_pool.PoolTimeout):
                async with pool.connection():
                    pass

    asyncio.run(main())
    assert signer.calls == 0
    assert _refused_in_pool_log(caplog, "use another Endpoint")


def test_pool_kwargs_callable_that_keeps_the_endpoint_connects(emulator: Emulator) -> None:
    """A kwargs callable with harmless arguments still connects through the emulator."""
    with (
        iampg.ConnectionPool(
            endpoint_for(emulator),
            kwargs=lambda: {"application_name": "pooled", "sslmode": "verify-full"},
            min_size=0,
            max_size=1,
            timeout=10.0,
            open=False,
        ) as pool,
        pool.connection() as conn,
    ):
        row = conn.execute("select current_setting('application_name')").fetchone()
        assert row == ("pooled",)


def test_sqlalchemy_checks_connect_args() -> None:
    """SQLAlchemy connect_args that would send the token in plaintext are refused."""
    from iampg.integrations import sqlalchemy as iampg_sqlalchemy

    provider, signer = _provider()
    for connect_args, words in [
        ({"sslmode": "disable"}, "unencrypted"),
        ({"hostaddr": "127.0.0.9"}, "use another Endpoint"),
        ({"host": "evil.example.com"}, "use another Endpoint"),
    ]:
        engine = iampg_sqlalchemy.create_engine(provider, connect_args=connect_args)
        with pytest.raises(iampg.ConfigurationError, match=words), engine.connect():
            pass
        engine.dispose()
    assert signer.calls == 0


def test_django_checks_options() -> None:
    """Django OPTIONS are checked when the entry is built and again when connecting."""
    pytest.importorskip("django")
    from django.conf import settings
    from django.db import utils as db_utils

    from iampg.integrations.django import database

    if not settings.configured:
        settings.configure(DATABASES={}, INSTALLED_APPS=[], USE_TZ=True)
        import django

        django.setup()
    provider, signer = _provider()
    with pytest.raises(iampg.ConfigurationError, match="unencrypted"):
        database(provider, options={"sslmode": "disable"})
    # An entry edited afterwards is checked again with what Django hands to psycopg.
    entry = database(provider)
    entry["OPTIONS"]["sslmode"] = "allow"
    conn = db_utils.ConnectionHandler({"default": entry})["default"]
    with pytest.raises(iampg.ConfigurationError, match="unencrypted"):
        conn.ensure_connection()
    assert signer.calls == 0


@pytest.mark.parametrize(
    ("ssl_argument", "words"),
    [
        (False, "unencrypted"),
        (None, "unencrypted"),
        ("prefer", "unencrypted"),
        ("unverified-context", "does not verify"),
    ],
)
def test_asyncpg_checks_its_ssl_argument(ssl_argument: object, words: str) -> None:
    """asyncpg's ssl= that may not encrypt, or does not verify, is refused for AWS hosts."""
    from iampg.integrations import asyncpg as iampg_asyncpg

    if ssl_argument == "unverified-context":
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        ssl_argument = context
    provider, signer = _provider()
    with pytest.raises(iampg.ConfigurationError, match=words):
        asyncio.run(iampg_asyncpg.connect(provider, ssl=ssl_argument))
    with pytest.raises(iampg.ConfigurationError, match=words):
        iampg_asyncpg.create_pool(provider, ssl=ssl_argument)
    assert signer.calls == 0


def test_asyncpg_allows_ssl_on_loopback(emulator: Emulator) -> None:
    """On loopback an explicit ssl= goes through (the emulator then refuses plaintext)."""
    import asyncpg

    from iampg.integrations import asyncpg as iampg_asyncpg

    async def main() -> None:
        with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="encryption"):
            await iampg_asyncpg.connect(endpoint_for(emulator), ssl=False)

    asyncio.run(main())


@pytest.mark.parametrize("command", ["token", "url", "env", "psql"])
def test_cli_refuses_plaintext_to_a_remote_host(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every command exits 2 with one line for --sslmode disable towards an AWS host."""
    extra = ["--psql", "/bin/true"] if command == "psql" else []
    code = main([command, HOST, "--user", "app", "--sslmode", "disable", *extra])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert "unencrypted" in captured.err


class _RefusedSigner:
    """Signs real tokens, damages their signature so the server refuses them, keeps them."""

    def __init__(self) -> None:
        from iampg._aws import AwsSigner

        self.inner = AwsSigner()
        self.tokens: list[str] = []

    def sign(self, endpoint: Endpoint, lifetime: float = 900.0) -> iampg.SignedToken:
        token = self.inner.sign(endpoint, lifetime).token
        token = token[:-1] + ("0" if token[-1] != "0" else "1")
        self.tokens.append(token)
        return iampg.SignedToken(token, 900.0)


def _iampg_frame_locals(exc: BaseException) -> list[str]:
    """Return the repr of every local of iampg's own frames in the error's traceback chain."""
    import traceback
    from pathlib import Path

    package = str(Path(iampg.__file__).parent)
    shown: list[str] = []
    seen: set[int] = set()
    todo: list[traceback.TracebackException] = [
        traceback.TracebackException.from_exception(exc, capture_locals=True)
    ]
    while todo:
        te = todo.pop()
        if id(te) in seen:
            continue
        seen.add(id(te))
        for frame in te.stack:
            if frame.filename.startswith(package) and frame.locals:
                shown.extend(f"{frame.name}: {k}={v}" for k, v in frame.locals.items())
        todo.extend(t for t in (te.__cause__, te.__context__) if t is not None)
    return shown


@pytest.mark.parametrize("flavour", ["connect", "aconnect"])
def test_tracebacks_of_a_refused_connect_show_no_token(emulator: Emulator, flavour: str) -> None:
    """capture_locals of a refused connect shows no token in any of iampg's frames."""
    signer = _RefusedSigner()
    provider = TokenProvider(endpoint_for(emulator), signer=signer)

    def attempt() -> object:
        if flavour == "connect":
            return iampg.connect(provider=provider)
        return asyncio.run(iampg.aconnect(provider=provider))

    with pytest.raises(iampg.AuthenticationError) as info:
        attempt()
    assert len(signer.tokens) == 2  # refused, retried once with a new token, refused again
    shown = _iampg_frame_locals(info.value)
    assert any(line.startswith(f"{flavour}: token=") for line in shown)  # the frame is there
    for token in signer.tokens:
        signature = token.rsplit("X-Amz-Signature=", 1)[1]
        assert not [line for line in shown if token in line or signature in line]
