"""Shared fixtures: an isolated AWS environment, a real PostgreSQL, and the emulator."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import settings

from iampg import _aws
from iampg.emulator import FAKE_CREDENTIALS, Backend, Emulator
from support import EmulatorFactory

# Every test runs under the secret guard: no minted token, signature or sentinel password in a
# log record, a repr or an escaping exception (see secret_guard.py).
pytest_plugins = ["secret_guard", "proxy_support"]

LOCAL_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=3"

# Hypothesis: the full profile in CI (where $CI is set), a lighter one locally; tests that name
# their own example count scale it to the profile with support.examples(). $HYPOTHESIS_PROFILE
# picks one explicitly.
settings.register_profile("ci", max_examples=100, print_blob=True)
settings.register_profile("dev", max_examples=10)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev")
)


def pytest_configure(config: pytest.Config) -> None:
    """On Python 3.10 only, let asyncio's old SSL transport be collected unclosed quietly.

    3.10's ``asyncio.sslproto`` (rewritten in 3.11) leaves the transport of a TLS connection
    that asyncpg dropped abruptly for the garbage collector, whose ResourceWarning then fails
    whichever test is running. The tests that cut connections check for open sockets
    themselves (support.open_sockets); 3.11 and later still turn the warning into an error.
    """
    if sys.version_info < (3, 11):
        config.addinivalue_line(
            "filterwarnings", "ignore:unclosed transport <asyncio.sslproto:ResourceWarning"
        )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the documentation's blocks slow: they run programs and emulators as a reader would."""
    for item in items:
        if item.nodeid.startswith("tests/docs/"):
            item.add_marker(pytest.mark.slow)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Say why a run selected no test: the default run leaves out the slow tests and the soak."""
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(
                'no test selected: the default run is -m "not slow and not soak"; '
                'add -m "not soak" for the slow tests too, or use nox -s soak'
            )


@pytest.fixture(autouse=True)
def _isolated_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Give botocore the documented fake keys and no config files, never a real credential."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "PG")):
            monkeypatch.delenv(name)
    missing = str(tmp_path / "no-aws-config")
    monkeypatch.setenv("AWS_CONFIG_FILE", missing)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", missing)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_CREDENTIALS.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_CREDENTIALS.secret_access_key)
    # Providers share one signer per credential source for the whole process; each test
    # starts from none, so credentials cached for one test do not leak into the next.
    _aws._shared.clear()


@pytest.fixture(scope="session")
def backend() -> Iterator[Backend]:
    """Return a real PostgreSQL: $IAMPG_TEST_BACKEND_DSN, the local server, or a throwaway one."""
    dsn = os.environ.get("IAMPG_TEST_BACKEND_DSN")
    if dsn:
        yield Backend.from_dsn(dsn)
        return
    try:
        psycopg.connect(LOCAL_DSN).close()
    except psycopg.OperationalError:
        with Backend.temporary() as temporary:
            yield temporary
    else:
        yield Backend.from_dsn(LOCAL_DSN)


@pytest.fixture
def start_emulator(backend: Backend) -> Iterator[EmulatorFactory]:
    """Return a factory of running emulators in front of the backend, stopped after the test.

    ``start_emulator(**options)`` takes :class:`Emulator`'s keyword options (``service``,
    ``credentials``, ``clock`` …); ``dsn=`` puts another backend behind it.
    """
    with ExitStack() as running:

        def start(*, dsn: str | None = None, **options: Any) -> Emulator:
            return running.enter_context(Emulator(backend.dsn if dsn is None else dsn, **options))

        yield start


@pytest.fixture
def emulator(start_emulator: EmulatorFactory) -> Emulator:
    """Return a running RDS-mode emulator in front of the backend, on real time."""
    return start_emulator()


@pytest.fixture
def quiet_botocore(caplog: pytest.LogCaptureFixture) -> None:
    """Keep botocore's DEBUG lines (which show signatures) out of failure reports."""
    caplog.set_level(logging.WARNING, logger="botocore")


@pytest.fixture(scope="module")
def django_configured() -> None:
    """Configure a minimal Django once: no apps, time zones on, databases per test."""
    django = pytest.importorskip("django")
    from django.conf import settings as django_settings

    if not django_settings.configured:
        django_settings.configure(DATABASES={}, INSTALLED_APPS=[], USE_TZ=True)
        django.setup()
