"""The emulator's shiftable, scalable clock for token and credential expiry."""

from __future__ import annotations

import math
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["EmulatorClock"]


class EmulatorClock:
    """The emulator's view of time: real wall time, sped up and shifted forward on demand.

    Tests move this clock instead of sleeping: :meth:`advance` jumps emulated time forward
    and ``time_scale`` makes it run faster than real time (``60.0`` turns a token's
    15 minutes into 15 real seconds). Thread-safe.

    A jump ages what was signed *before* it, not what is signed after: a client whose own
    clock jumped with the emulator's would date its next token after the jump. Give a
    :class:`iampg.TokenProvider` ``clock=emulator.clock.monotonic`` and both sides move
    together: the provider sees its token expire and the emulator accepts the next one.

    Args:
        time_scale: Emulated seconds per real second; must be positive.
        wall: The real wall clock, in epoch seconds; injectable for tests.
        monotonic: The real monotonic clock behind :meth:`monotonic`.

    Raises:
        ValueError: ``time_scale`` is not a positive finite number.
    """

    def __init__(
        self,
        time_scale: float = 1.0,
        *,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if not (math.isfinite(time_scale) and time_scale > 0):
            raise ValueError(f"time_scale must be a positive number, not {time_scale!r}")
        self._scale = float(time_scale)
        self._wall = wall
        self._monotonic = monotonic
        self._start = wall()
        self._mono_start = monotonic()
        self._offset = 0.0
        # (wall time from which signatures are dated after the jump, emulated seconds)
        self._jumps: list[tuple[float, float]] = []
        self._lock = threading.Lock()

    @property
    def time_scale(self) -> float:
        """Emulated seconds per real second."""
        return self._scale

    @property
    def offset(self) -> float:
        """Total emulated seconds added by :meth:`advance`."""
        with self._lock:
            return self._offset

    def advance(self, seconds: float) -> None:
        """Move emulated time forward: everything signed until now ages by ``seconds``.

        SigV4 dates have a resolution of one second, so on the real wall clock this returns
        at the start of the next second (waiting at most one second): every token signed
        before the call is then dated before the jump, and every token signed after it,
        after.

        Args:
            seconds: Emulated seconds to add; must be finite and not negative.

        Raises:
            ValueError: ``seconds`` is negative or not finite.
        """
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"seconds must be a finite number >= 0, not {seconds!r}")
        with self._lock:
            boundary = math.floor(self._wall()) + 1.0
            self._jumps.append((boundary, float(seconds)))
            self._offset += seconds
        if self._wall is time.time:
            delay = boundary - time.time()
            if delay > 0:
                time.sleep(delay)

    def token_age(self, signed_at: float) -> float:
        """Return the emulated age of something signed at a given wall time.

        Args:
            signed_at: Wall-clock epoch seconds of the signature (``X-Amz-Date``).

        Returns:
            ``(now - signed_at) * time_scale`` plus every :meth:`advance` made after
            ``signed_at``, in emulated seconds; negative for a signature dated in the future.
        """
        with self._lock:
            jumped = sum(s for boundary, s in self._jumps if signed_at < boundary)
        return (self._wall() - signed_at) * self._scale + jumped

    def monotonic(self) -> float:
        """Return a monotonic clock in emulated seconds, for the client side.

        It runs ``time_scale`` times faster than real time and includes every
        :meth:`advance`: pass it as ``TokenProvider(clock=emulator.clock.monotonic)``.
        """
        real = self._monotonic() - self._mono_start
        return self._mono_start + real * self._scale + self.offset

    def now(self) -> float:
        """Return the emulated wall-clock time, in epoch seconds.

        Emulated time starts at the clock's creation and runs ``time_scale`` times faster
        than real time, plus every :meth:`advance`. Credential expiry is compared with it.
        """
        return self._start + (self._wall() - self._start) * self._scale + self.offset

    def __repr__(self) -> str:
        return f"EmulatorClock(time_scale={self._scale!r}, offset={self.offset!r})"
