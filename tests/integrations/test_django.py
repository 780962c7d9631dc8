"""Django's PostgreSQL backend through the emulator, pooled and unpooled, across token expiry."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest

django = pytest.importorskip("django")

from django.db import utils as db_utils  # noqa: E402

from iampg import TokenProvider  # noqa: E402
from iampg._dsn import connect_params  # noqa: E402
from iampg.emulator import Emulator  # noqa: E402
from iampg.integrations.django import ENGINE, database  # noqa: E402
from support import endpoint_for  # noqa: E402

pytestmark = pytest.mark.usefixtures("django_configured")


@pytest.fixture
def handler() -> Iterator[dict[str, Any]]:
    """Yield a dict the test fills with DATABASES entries; close their connections after."""
    entries: dict[str, Any] = {}
    handlers: list[db_utils.ConnectionHandler] = []
    entries["_handlers"] = handlers
    yield entries
    for h in handlers:
        for conn in h.all(initialized_only=True):
            conn.close()
            conn.close_pool()


def _wrapper(entries: dict[str, Any], entry: dict[str, Any]) -> Any:
    """Return a Django connection (DatabaseWrapper) for ``entry``."""
    # Django keeps pools per alias, process-wide: the fixture closes them after each test.
    h = db_utils.ConnectionHandler({"default": entry})
    entries["_handlers"].append(h)
    return h["default"]


def _pid(conn: Any) -> int:
    with conn.cursor() as cur:
        cur.execute("select pg_backend_pid()")
        pid: int = cur.fetchone()[0]
    return pid


def test_unpooled_connections_sign_across_token_expiry(
    emulator: Emulator, handler: dict[str, Any]
) -> None:
    """Without a pool, each new Django connection after the token expired authenticates."""
    provider = TokenProvider(endpoint_for(emulator), clock=emulator.clock.monotonic)
    conn = _wrapper(handler, database(provider))
    first = _pid(conn)
    conn.close()
    emulator.clock.advance(901.0)
    second = _pid(conn)
    assert first != second
    assert provider.stats().refreshes == 2


@pytest.mark.slow
@pytest.mark.parametrize("frozen", [False, True], ids=["fresh-token", "frozen-token"])
def test_native_pool_signs_across_token_expiry(
    emulator: Emulator, handler: dict[str, Any], frozen: bool
) -> None:
    """Django's psycopg pool opens new connections after expiry; a frozen PASSWORD fails."""
    ep = endpoint_for(emulator)
    provider = TokenProvider(ep, clock=emulator.clock.monotonic)
    # The frozen PASSWORD's checkout ends in a deliberate PoolTimeout: keep that wait short.
    pool = {"min_size": 1, "max_size": 2, "timeout": 0.5 if frozen else 3.0}
    if frozen:
        # What DATABASES usually holds: the stock backend with one token as PASSWORD.
        params = connect_params(ep)
        entry = {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": params.pop("dbname"),
            "USER": params.pop("user"),
            "HOST": params.pop("host"),
            "PORT": params.pop("port"),
            "PASSWORD": provider.token(),
            "OPTIONS": {**params, "pool": pool},
        }
    else:
        entry = database(provider, pool=pool)
    conn = _wrapper(handler, entry)
    first = _pid(conn)
    conn.close()  # back to the pool
    emulator.clock.advance(901.0)
    conn.pool.drain()  # every pooled connection from now on is new
    if frozen:
        with pytest.raises(db_utils.OperationalError):
            _pid(conn)
        return
    second = _pid(conn)
    assert first != second
    assert conn.pool.get_stats().get("connections_errors", 0) == 0


@pytest.mark.slow
def test_refused_token_is_forgotten_and_explained(
    emulator: Emulator, handler: dict[str, Any]
) -> None:
    """A refused token is dropped, the error explains it, and the next connection works."""
    from iampg.errors import AuthenticationError

    provider = TokenProvider(endpoint_for(emulator))  # its clock does not move: skewed
    provider.token()
    emulator.clock.advance(901.0)
    conn = _wrapper(handler, database(provider))
    with pytest.raises(db_utils.OperationalError) as info:
        _pid(conn)
    assert isinstance(info.value.__cause__, AuthenticationError)
    assert _pid(conn) > 0


def test_entry_survives_deep_copy_and_holds_no_token(emulator: Emulator) -> None:
    """The entry deep-copies (Django's test runner does) with the same provider, no token."""
    provider = TokenProvider(endpoint_for(emulator))
    entry = database(provider, pool=True, CONN_HEALTH_CHECKS=True)
    clone = copy.deepcopy(entry)
    assert clone["OPTIONS"]["iampg_provider"].provider is provider
    assert entry["ENGINE"] == ENGINE
    assert entry["HOST"] == emulator.host
    assert entry["OPTIONS"]["hostaddr"] == emulator.listen_host
    assert entry["PASSWORD"] == ""
    assert entry["CONN_HEALTH_CHECKS"] is True
    assert "X-Amz" not in repr(entry)


def test_backend_without_a_provider_is_refused(handler: dict[str, Any]) -> None:
    """Using the ENGINE without database() is a clear configuration error."""
    from django.core.exceptions import ImproperlyConfigured

    conn = _wrapper(handler, {"ENGINE": ENGINE, "NAME": "postgres", "HOST": "127.0.0.1"})
    with pytest.raises(ImproperlyConfigured, match=r"database\(\.\.\.\)"):
        _pid(conn)
