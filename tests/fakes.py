"""Fakes for pure logic: a clock that moves when told and a signer that counts."""

from __future__ import annotations

import threading
import time

from iampg import Endpoint, SignedToken


class FakeClock:
    """A monotonic clock that only moves on :meth:`advance`."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class CountingSigner:
    """A signer that returns ``token-<n>``, counts calls and can be slow or failing."""

    def __init__(
        self,
        *,
        lifetime: float = 900.0,
        credentials_ttl: float | None = None,
        delay: float = 0.0,
    ) -> None:
        self.lifetime = lifetime
        self.credentials_ttl = credentials_ttl
        self.delay = delay
        self.calls = 0
        self.threads: list[int] = []
        self.spans: list[tuple[float, float]] = []  # time.monotonic() at start and end of each
        self.fail_with: Exception | None = None
        self._lock = threading.Lock()

    def sign(self, endpoint: Endpoint, lifetime: float = 900.0) -> SignedToken:
        started = time.monotonic()
        with self._lock:
            self.calls += 1
            n = self.calls
            self.threads.append(threading.get_ident())
        if self.delay:
            time.sleep(self.delay)
        with self._lock:
            self.spans.append((started, time.monotonic()))
        if self.fail_with is not None:
            raise self.fail_with
        return SignedToken(f"token-{n}-{endpoint.user}", self.lifetime, self.credentials_ttl)
