"""Thread-safety of the token cache under aggressive thread switching."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator

import pytest

from fakes import CountingSigner, FakeClock
from iampg import Endpoint, TokenProvider

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
