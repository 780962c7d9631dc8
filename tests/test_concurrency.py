"""Thread-safety of the token cache and the pools under aggressive thread switching."""

from __future__ import annotations

import asyncio
import collections
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg_pool
import pytest

import iampg
from fakes import CountingSigner, FakeClock
from iampg import Endpoint, TokenProvider
from iampg.emulator import Backend, Emulator
from support import endpoint_for

EP = Endpoint("mydb.cluster-abc.us-east-1.rds.amazonaws.com", user="app")


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Switch threads every microsecond, to shake out races the GIL usually hides."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


@pytest.mark.slow
@pytest.mark.usefixtures("fast_switching")
def test_many_threads_across_many_refresh_windows_sign_once_per_window() -> None:
    """32 threads hammer token() while the clock jumps 25 refresh windows: one signing each."""
    signer = CountingSigner()
    clock = FakeClock()
    provider = TokenProvider(EP, signer=signer, clock=clock)
    windows = 25
    stop = threading.Event()
    seen: list[set[str]] = [set() for _ in range(32)]
    errors: list[BaseException] = []

    def reader(i: int) -> None:
        try:
            while not stop.is_set():
                seen[i].add(provider.token())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for _ in range(windows):
        before = signer.calls
        clock.advance(600.0)  # exactly the refresh point of the current token
        for _ in range(5000):  # bounded: at most ~5 s for a reader to refresh
            if signer.calls != before:
                break
            stop.wait(0.001)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    assert signer.calls == windows + 1
    tokens = set().union(*seen)
    assert tokens <= {f"token-{n}-app" for n in range(1, windows + 2)}
    assert f"token-{windows + 1}-app" in tokens


@pytest.mark.usefixtures("fast_switching")
def test_async_callers_on_many_loops_sign_once_per_window() -> None:
    """8 threads, each with its own event loop and 20 tasks, share one provider: one signing
    per refresh window, and every task gets a token of its window."""
    signer = CountingSigner()
    clock = FakeClock()
    provider = TokenProvider(EP, signer=signer, clock=clock)
    windows = 10
    barrier = threading.Barrier(9)
    errors: list[BaseException] = []
    seen: list[set[str]] = [set() for _ in range(8)]

    def loop_thread(i: int) -> None:
        async def round_() -> None:
            tokens = await asyncio.gather(*(provider.atoken() for _ in range(20)))
            seen[i].update(tokens)

        try:
            for _ in range(windows + 1):
                barrier.wait(timeout=30)  # the clock moved: everybody asks at once
                asyncio.run(round_())
                barrier.wait(timeout=30)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=loop_thread, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for window in range(windows + 1):
        barrier.wait(timeout=30)
        barrier.wait(timeout=30)  # this window's round is over on every loop
        assert signer.calls == window + 1
        clock.advance(900.0)  # expired: every caller must wait for the one signing
    for t in threads:
        t.join(timeout=30)
    assert not errors
    assert set().union(*seen) == {f"token-{n}-app" for n in range(1, windows + 2)}


@pytest.mark.slow
@pytest.mark.usefixtures("fast_switching")
def test_pool_threads_across_token_expiry(backend: Backend) -> None:
    """16 threads on one pool while tokens expire and connections are recycled: every query
    answers its own thread, every new connection is accepted, one signing per token."""
    with Emulator(backend.dsn) as emu:
        provider = TokenProvider(endpoint_for(emu), clock=emu.clock.monotonic)
        errors: list[BaseException] = []
        answered = collections.Counter[int]()
        stop = threading.Event()

        def worker(i: int, pool: psycopg_pool.ConnectionPool[Any]) -> None:
            try:
                while not stop.is_set():
                    with pool.connection() as conn:
                        row = conn.execute("select %s::int", (i,)).fetchone()
                    assert row == (i,)
                    answered[i] += 1
            except BaseException as exc:
                errors.append(exc)

        with iampg.ConnectionPool(
            provider=provider, min_size=2, max_size=6, timeout=20, open=True
        ) as pool:
            threads = [threading.Thread(target=worker, args=(i, pool)) for i in range(16)]
            for t in threads:
                t.start()
            expiries = 3
            for _ in range(expiries):
                time.sleep(0.3)
                emu.clock.advance(901.0)  # every token signed so far has expired
                pool.drain()  # so every connection from now on needs a new one
            time.sleep(0.3)
            stop.set()
            for t in threads:
                t.join(timeout=60)
            stats = pool.get_stats()
        rejected = [e for e in emu.events if e.outcome == "rejected"]
    assert not errors
    assert sorted(answered) == list(range(16))
    assert stats.get("connections_errors", 0) == 0
    assert rejected == []
    assert provider.stats().refreshes == expiries + 1
