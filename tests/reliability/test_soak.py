"""Soak: threads and tasks querying through pools while keys rotate and the gateway restarts."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psycopg
import psycopg_pool
import pytest

import iampg
from iampg import Endpoint, TokenProvider
from iampg.emulator import Backend, CredentialsServer, CredentialStore, Emulator, EmulatorClock

T = TypeVar("T")

SECONDS = float(os.environ.get("IAMPG_SOAK_SECONDS", "15"))  # real seconds of load
TIME_SCALE = 60.0  # emulated seconds per real second: a 15-minute token lasts 15 s
KEY_LIFETIME = 180.0  # emulated seconds each container key lives (3 real seconds)
ROTATION = 60.0  # emulated seconds the same key is handed out (1 real second)
BUFFER = 0.5  # real seconds before the keys' expiry a token is replaced
THREADS = 8
TASKS = 100
RESTARTS = 2
ATTEMPTS = 6  # the application's own retry of a query whose connection was cut


@pytest.fixture(autouse=True)
def _quiet_logs(caplog: pytest.LogCaptureFixture) -> None:
    """Keep botocore's and the pools' DEBUG chatter out of the run (and of failure reports)."""
    caplog.set_level(logging.WARNING, logger="botocore")
    caplog.set_level(logging.WARNING, logger="urllib3")
    caplog.set_level(logging.INFO, logger="psycopg")


@dataclass
class Tally:
    """Queries done, retried and lost, under a lock."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    ok: int = 0
    retried: int = 0
    failed: list[str] = field(default_factory=list)

    def count(self, *, ok: bool, retried: int, error: str = "") -> None:
        """Add one application query's outcome."""
        with self.lock:
            self.retried += retried
            if ok:
                self.ok += 1
            else:
                self.failed.append(error)


def with_retry(run: Callable[[], T]) -> tuple[T, int]:
    """Run ``run`` again on OperationalError (a cut connection), up to ATTEMPTS times."""
    for attempt in range(ATTEMPTS):
        try:
            return run(), attempt
        except psycopg.OperationalError:  # noqa: PERF203 -- retrying is the point
            if attempt == ATTEMPTS - 1:
                raise
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")  # pragma: no cover


async def awith_retry(run: Callable[[], Awaitable[T]]) -> tuple[T, int]:
    """The asynchronous twin of :func:`with_retry`."""
    for attempt in range(ATTEMPTS):
        try:
            return await run(), attempt
        except psycopg.OperationalError:  # noqa: PERF203 -- retrying is the point
            if attempt == ATTEMPTS - 1:
                raise
            await asyncio.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")  # pragma: no cover


def client_backends(backend: Backend) -> int:
    """Return how many client sessions the real PostgreSQL has, besides this one."""
    with psycopg.connect(backend.dsn, connect_timeout=3) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
        ).fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.slow
def test_soak(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: C901, PLR0915 -- one scenario, told in order
    """No query lost, no session leaked, signings bounded by refreshes, through 2 restarts."""
    baseline = client_backends(backend)
    clock = EmulatorClock(TIME_SCALE)
    store = CredentialStore()
    settings = {"profile": "aurora-express", "auto_pause": None}
    emu = Emulator(backend.dsn, credentials=store, clock=clock, **settings)  # type: ignore[arg-type]
    emu.start()
    port = emu.port
    server = CredentialsServer(store, clock=clock, lifetime=KEY_LIFETIME, rotation=ROTATION)
    server.start()
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    # The CA changes at each restart, so TLS without CA pinning (sslmode=require, loopback).
    endpoint = Endpoint(
        emu.host,
        user="postgres",
        port=port,
        hostaddr="127.0.0.1",
        region=emu.region,
        sslmode="require",
        connect_timeout="5",
    )
    # Real time for the provider: botocore reports the keys' remaining life in real seconds.
    provider = TokenProvider(endpoint, refresh_buffer=BUFFER)
    tally = Tally()
    stop = threading.Event()
    pool = iampg.ConnectionPool(
        provider=provider,
        profile="aurora-serverless",
        min_size=2,
        max_size=THREADS,
        check=psycopg_pool.ConnectionPool.check_connection,
        open=True,
        timeout=30,
    )

    def worker() -> None:
        while not stop.is_set():
            try:
                value, retried = with_retry(
                    lambda: iampg.retry_transaction(
                        pool, lambda conn: conn.execute("SELECT 1").fetchone()
                    )
                )
            except psycopg.Error as exc:
                tally.count(ok=False, retried=ATTEMPTS, error=type(exc).__name__)
            else:
                tally.count(ok=value == (1,), retried=retried, error="wrong result")
            time.sleep(0.005)

    async def one_task(
        apool: psycopg_pool.AsyncConnectionPool[psycopg.AsyncConnection[Any]],
    ) -> None:
        async def query() -> object:
            async with apool.connection() as conn:
                cur = await conn.execute("SELECT 1")
                return await cur.fetchone()

        while not stop.is_set():
            try:
                value, retried = await awith_retry(query)
            except psycopg.Error as exc:
                tally.count(ok=False, retried=ATTEMPTS, error=type(exc).__name__)
            else:
                tally.count(ok=value == (1,), retried=retried, error="wrong result")
            await asyncio.sleep(0.02)

    async def tasks() -> None:
        apool = iampg.AsyncConnectionPool(
            provider=provider, profile="aurora-serverless", min_size=2, max_size=10, timeout=30
        )
        async with apool:
            await asyncio.gather(*(one_task(apool) for _ in range(TASKS)))

    threads = [threading.Thread(target=worker, name=f"soak-{i}") for i in range(THREADS)]
    threads.append(threading.Thread(target=lambda: asyncio.run(tasks()), name="soak-async"))
    started = time.monotonic()
    emulated_start = clock.now()
    for thread in threads:
        thread.start()
    try:
        for _ in range(RESTARTS):
            time.sleep(SECONDS / (RESTARTS + 1))
            emu.stop()
            emu = Emulator(backend.dsn, credentials=store, clock=clock, port=port, **settings)  # type: ignore[arg-type]
            emu.start()
        time.sleep(max(0.0, SECONDS - (time.monotonic() - started)))
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        pool.close()
        emu.stop()
        server.stop()
    assert not any(thread.is_alive() for thread in threads)
    emulated = clock.now() - emulated_start
    elapsed = time.monotonic() - started
    stats = provider.stats()
    assert tally.failed == []
    assert tally.ok > 100 * SECONDS  # the load was real
    # One signing per credential period, give or take: not one per connection.
    shortest = (KEY_LIFETIME - ROTATION) / TIME_SCALE - BUFFER  # real s a token is used, least
    assert stats.refreshes <= elapsed / shortest + 10
    assert stats.refreshes < tally.ok / 10
    deadline = time.monotonic() + 10
    while client_backends(backend) > baseline and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client_backends(backend) <= baseline
    logging.getLogger("iampg.tests.soak").info(
        "soak: %d queries ok, %d retries, %d signings over %.0f emulated s",
        tally.ok,
        tally.retried,
        stats.refreshes,
        emulated,
    )
