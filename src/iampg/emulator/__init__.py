"""Local emulator of IAM-authenticated AWS PostgreSQL services (needs ``iampg[emulator]``)."""

from __future__ import annotations

from ._backend import Backend
from ._clock import EmulatorClock
from ._credentials import FAKE_CREDENTIALS, Credentials
from ._gateway import DEFAULT_HOSTNAME, Emulator, Event

__all__ = [
    "DEFAULT_HOSTNAME",
    "FAKE_CREDENTIALS",
    "Backend",
    "Credentials",
    "Emulator",
    "EmulatorClock",
    "Event",
]
