"""Soak: pools under key rotation, expiring tokens, idle cuts, DSQL's cap and gateway restarts."""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import time
from typing import Any

import psycopg
import pytest

import iampg
from iampg import Endpoint, TokenProvider
from iampg.emulator import (
    Backend,
    CredentialsServer,
    CredentialStore,
    Emulator,
    EmulatorClock,
    Event,
)
from support import open_sockets, sessions_left, sessions_of

SECONDS = float(os.environ.get("IAMPG_SOAK_SECONDS", "20"))  # real seconds of load
TIME_SCALE = 60.0  # emulated seconds per real second: a 15-minute token lasts 15 s
KEY_LIFETIME = 180.0  # emulated seconds each container key lives (3 real seconds)
ROTATION = 60.0  # emulated seconds the same key is handed out (1 real second)
BUFFER = 0.5  # real seconds before the keys' expiry a token is replaced
THREADS = 8  # of which DSQL_THREADS query DSQL, the others Aurora
DSQL_THREADS = 2
TASKS = 100
RESTARTS = 2
ATTEMPTS = 6
# Aurora Serverless cuts sessions idle for 300 emulated s (5 real s): a pool used less often
# than that finds its connection cut at every use.
RARE_EVERY = 6.5
# DSQL closes sessions after an hour; shortened so that the cap strikes several times even in
# the CI-length run (the pool's max_lifetime, 3300 s, is left as documented, in real seconds).
DSQL_CAP = TIME_SCALE * max(3.0, SECONDS / 8)
# Every soak connection says so, so the leak check counts only the soak's own sessions.
APPLICATION = "iampg-soak"


class Gateway:
    """An emulator restarted in place (same port, same keys and clock), keeping every event."""

    def __init__(self, dsn: str, **settings: Any) -> None:
        self._dsn = dsn
        self._settings = settings
        self._earlier: list[Event] = []
        self.emu = Emulator(dsn, **settings)
        self.emu.start()
        self.port = self.emu.port

    def restart(self) -> None:
        """Stop the gateway (cutting every session) and start a new one on the same port."""
        self.emu.stop()
        leftover = open_sockets(self.port, side="local")
        assert not leftover, f"sockets the stopped gateway left open: {leftover}"
        self._earlier += self.emu.events
        self.emu = Emulator(self._dsn, port=self.port, **self._settings)
        self.emu.start()

    def events(self) -> collections.Counter[tuple[str, str]]:
        """Count (outcome, reason) over every instance so far."""
        return collections.Counter((e.outcome, e.reason) for e in self._earlier + self.emu.events)

    def endpoint(self, user: str) -> Endpoint:
        """The endpoint a client uses: signed name, loopback address, TLS without CA pinning.

        The CA changes at each restart, hence ``sslmode=require`` (allowed on loopback).
        """
        return Endpoint(
            self.emu.host,
            user=user,
            port=self.port,
            hostaddr="127.0.0.1",
            region=self.emu.region,
            sslmode="require",
            connect_timeout="5",
            application_name=APPLICATION,
        )


class Tally:
    """Application queries that succeeded and failed, and the retry helper's retries."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ok: collections.Counter[str] = collections.Counter()
        self.failed: list[str] = []
        self.retries: collections.Counter[str] = collections.Counter()

    def done(self, where: str, value: object) -> None:
        """Count one query's result."""
        with self.lock:
            if value == (1,):
                self.ok[where] += 1
            else:
                self.failed.append(f"{where}: wrong result {value!r}")

    def fail(self, where: str, exc: BaseException) -> None:
        """Count one lost query."""
        with self.lock:
            self.failed.append(f"{where}: {type(exc).__name__}: {exc}")


class RetryCounter(logging.Handler):
    """Counts retry_transaction's retries by reason, from its DEBUG records."""

    def __init__(self, tally: Tally) -> None:
        super().__init__(logging.DEBUG)
        self.tally = tally

    def emit(self, record: logging.LogRecord) -> None:
        reason = str(record.args[0]) if isinstance(record.args, tuple) and record.args else "?"
        with self.tally.lock:
            self.tally.retries[reason] += 1


def select_one(conn: psycopg.Connection[Any]) -> object:
    """The application's query."""
    return conn.execute("SELECT 1").fetchone()


async def aselect_one(conn: psycopg.AsyncConnection[Any]) -> object:
    """The application's query, asynchronously."""
    return await (await conn.execute("SELECT 1")).fetchone()


@pytest.fixture(autouse=True)
def _quiet_logs(caplog: pytest.LogCaptureFixture) -> None:
    """Keep botocore's and the pools' DEBUG chatter out of the run (and of failure reports)."""
    caplog.set_level(logging.WARNING, logger="botocore")
    caplog.set_level(logging.WARNING, logger="urllib3")
    caplog.set_level(logging.INFO, logger="psycopg")


@pytest.mark.soak
def test_soak(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: C901, PLR0915 -- one scenario, told in order
    """No query lost, no session leaked, signings bounded by token periods, through it all."""
    backend.ensure_role("admin", superuser=True)
    clock = EmulatorClock(TIME_SCALE)
    store = CredentialStore()
    aurora = Gateway(
        backend.dsn, preset="aurora-express", auto_pause=None, credentials=store, clock=clock
    )
    dsql = Gateway(backend.dsn, preset="dsql", session_cap=DSQL_CAP, credentials=store, clock=clock)
    server = CredentialsServer(store, clock=clock, lifetime=KEY_LIFETIME, rotation=ROTATION)
    server.start()
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    tally = Tally()
    counter = RetryCounter(tally)
    retry_logger = logging.getLogger("iampg.retry")
    retry_logger.addHandler(counter)
    monkeypatch.setattr(retry_logger, "level", logging.DEBUG)
    # Real time for the providers: botocore reports the keys' remaining life in real seconds.
    aurora_tokens = TokenProvider(aurora.endpoint("postgres"), refresh_buffer=BUFFER)
    dsql_tokens = TokenProvider(dsql.endpoint("admin"), refresh_buffer=BUFFER)
    # Pools with the documented per-service settings, as an application would write them.
    pools = {
        "aurora": iampg.ConnectionPool(
            provider=aurora_tokens, preset="aurora-serverless", open=True, timeout=30
        ),
        "aurora-rare": iampg.ConnectionPool(
            provider=aurora_tokens, preset="aurora-serverless", open=True, timeout=30
        ),
        "dsql": iampg.ConnectionPool(provider=dsql_tokens, preset="dsql", open=True, timeout=30),
    }
    stop = threading.Event()

    def worker(where: str, pause: float) -> None:
        while not stop.is_set():
            try:
                value = iampg.retry_transaction(
                    pools[where], select_one, attempts=ATTEMPTS, idempotent=True
                )
            except psycopg.Error as exc:
                tally.fail(where, exc)
            else:
                tally.done(where, value)
            stop.wait(pause)

    async def tasks() -> None:
        async with iampg.AsyncConnectionPool(
            provider=aurora_tokens, preset="aurora-serverless", timeout=30
        ) as apool:

            async def one() -> None:
                while not stop.is_set():
                    try:
                        value = await iampg.aretry_transaction(
                            apool, aselect_one, attempts=ATTEMPTS, idempotent=True
                        )
                    except psycopg.Error as exc:
                        tally.fail("aurora-async", exc)
                    else:
                        tally.done("aurora-async", value)
                    await asyncio.sleep(0.02)

            await asyncio.gather(*(one() for _ in range(TASKS)))

    threads = [
        threading.Thread(target=worker, args=("dsql" if i < DSQL_THREADS else "aurora", 0.005))
        for i in range(THREADS)
    ]
    threads.append(threading.Thread(target=worker, args=("aurora-rare", RARE_EVERY)))
    threads.append(threading.Thread(target=lambda: asyncio.run(tasks())))
    started = time.monotonic()
    for thread in threads:
        thread.start()
    live: list[tuple[Any, ...]] = []
    try:
        for _ in range(RESTARTS):
            time.sleep(SECONDS / (RESTARTS + 1))
            live = live or sessions_of(backend, APPLICATION)  # the leak check can see them
            aurora.restart()
            dsql.restart()
        time.sleep(max(0.0, SECONDS - (time.monotonic() - started)))
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        for pool in pools.values():
            pool.close()
        aurora.emu.stop()
        dsql.emu.stop()
        server.stop()
        retry_logger.removeHandler(counter)
    elapsed = time.monotonic() - started
    assert not any(thread.is_alive() for thread in threads)
    aurora_events, dsql_events = aurora.events(), dsql.events()

    # Nothing lost, and the load was real on every path.
    assert tally.failed == []
    assert tally.ok["aurora"] > 50 * SECONDS
    assert tally.ok["aurora-async"] > 50 * SECONDS
    assert tally.ok["dsql"] > 20 * SECONDS
    assert tally.ok["aurora-rare"] >= 2
    # What the services did happened: idle cuts, DSQL's cap; and no token was ever refused.
    assert aurora_events["closed", "idle timeout"] >= 1
    assert dsql_events["closed", "session cap"] >= 1
    rejected = {k: n for k, n in (aurora_events + dsql_events).items() if k[0] == "rejected"}
    assert rejected == {}
    # The retry helper is what kept queries alive through the cuts and restarts.
    assert tally.retries["connection lost"] >= 1
    # Signings follow the token periods, not the connections: at most one per period in which
    # a connection was made (a key lives at least KEY_LIFETIME - ROTATION emulated seconds).
    shortest = (KEY_LIFETIME - ROTATION) / TIME_SCALE - BUFFER  # real s a token is used, least
    connections = aurora_events["accepted", ""] + dsql_events["accepted", ""]
    signings = aurora_tokens.stats().refreshes + dsql_tokens.stats().refreshes
    assert aurora_tokens.stats().refreshes <= elapsed / shortest + 2
    assert dsql_tokens.stats().refreshes <= elapsed / shortest + 2
    # Nothing leaked: none of the soak's sessions is left on the backend.
    assert live, "the soak's sessions were not found on the backend by their application_name"
    assert sessions_left(backend, APPLICATION) == []
    summary = (
        f"soak {elapsed:.0f} s ({elapsed * TIME_SCALE / 60:.0f} emulated min): "
        f"queries ok {dict(tally.ok)}, failed {len(tally.failed)}; "
        f"retries {dict(tally.retries)}; connections made {connections}; signings {signings}; "
        f"aurora events {dict(aurora_events)}; dsql events {dict(dsql_events)}"
    )
    logging.getLogger("iampg.tests.soak").info("%s", summary)
    print(summary)  # noqa: T201 -- the figures for docs/reliability.md (pytest -s)
