"""Serverless and DSQL behaviour without I/O: wire texts, hints, rate limit, status scanner."""

from __future__ import annotations

import asyncio
import struct
import time
from typing import TYPE_CHECKING, Final

from . import _sigv4

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._clock import EmulatorClock

__all__ = [
    "ReadyForQueryScanner",
    "TokenBucket",
    "dsql_hint",
    "sleep_emulated",
]

# --- what clients see (FACTS.md); unconfirmed ones say so ---

DSQL_ACCESS_DENIED: Final = "unable to accept connection, access denied"
DSQL_ACCESS_DENIED_CODE: Final = "08006"
DSQL_NO_SNI: Final = "unable to accept connection, sni was not received"
#: Unconfirmed: FACTS.md gives the text without a code; 08006 like the other refusals.
DSQL_NO_SNI_CODE: Final = "08006"
DSQL_TOO_MANY: Final = "unable to accept connection, too many open connections."
DSQL_TOO_MANY_CODE: Final = "53300"
DSQL_RATE: Final = "unable to accept connection, rate exceeded."
DSQL_RATE_CODE: Final = "53400"
DSQL_WAKING: Final = "unable to accept connection, waking up cluster, please retry later"
#: Unconfirmed: no code is on record; 57P03 (cannot_connect_now) is PostgreSQL's own code
#: for "the database system is starting up", the closest meaning.
DSQL_WAKING_CODE: Final = "57P03"
#: PostgreSQL's text for too many connections (RDS and Aurora are PostgreSQL here).
PG_TOO_MANY: Final = "sorry, too many clients already"
PG_TOO_MANY_CODE: Final = "53300"
#: PostgreSQL's own idle_session_timeout message, sent before an idle cut when asked.
IDLE_TIMEOUT: Final = "terminating connection due to idle-session timeout"
IDLE_TIMEOUT_CODE: Final = "57P05"

# --- DSQL HINTs; only the wrong-action one is confirmed word for word ---

HINT_WRONG_ACTION: Final = "Wrong user to action mapping. user: {user}, action: {action}"
#: Unconfirmed beyond its start ("Signature expired: "): the wording of AWS's SigV4 error.
HINT_EXPIRED: Final = (
    "Signature expired: {signed} is now earlier than {earliest} ({now} - {window})"
)
#: Unconfirmed: AWS's usual texts for these SigV4 failures.
HINT_SIGNATURE: Final = (
    "The request signature we calculated does not match the signature you provided. "
    "Check your AWS Secret Access Key and signing method."
)
HINT_CREDENTIALS_EXPIRED: Final = "The security token included in the request is expired"
HINT_UNKNOWN_KEY: Final = "The security token included in the request is invalid"
#: Unconfirmed: any other refusal gets this, with the emulator's reason.
HINT_OTHER: Final = "Invalid authentication token: {reason}"

_AMZ_DATE: Final = "%Y%m%dT%H%M%SZ"
_MINUTE: Final = 60
_TICK: Final = 0.05  # real seconds between clock reads while waiting on emulated time
_HEADER: Final = 5


def _amz(epoch: float) -> str:
    return time.strftime(_AMZ_DATE, time.gmtime(epoch))


def dsql_hint(reason: str, token: str, *, user: str, clock: EmulatorClock) -> str:
    """Return the HINT DSQL sends with ``access denied`` for a refused token.

    Args:
        reason: The emulator's reason (a ``TokenVerificationError.reason``).
        token: The refused token; only its ``Action``, ``X-Amz-Date`` and
            ``X-Amz-Expires`` are read, never echoed whole.
        user: The startup message's user.
        clock: The emulator's clock, for the expiry hint's "now".

    Returns:
        One line without secrets.
    """
    params = _sigv4.token_parameters(token)
    if reason == _sigv4.WRONG_ACTION:
        return HINT_WRONG_ACTION.format(user=user, action=params.get("Action", ""))
    if reason == _sigv4.TOKEN_EXPIRED:
        signed_text = params.get("X-Amz-Date", "")
        signed = _sigv4.parse_amz_date(signed_text)
        expires = int(params.get("X-Amz-Expires", "0"))
        if signed is not None:
            now = signed + clock.token_age(signed)
            window = f"{expires // _MINUTE} min." if expires % _MINUTE == 0 else f"{expires} sec."
            return HINT_EXPIRED.format(
                signed=signed_text, earliest=_amz(now - expires), now=_amz(now), window=window
            )
    if reason == _sigv4.SIGNATURE_MISMATCH:
        return HINT_SIGNATURE
    if reason == _sigv4.CREDENTIALS_EXPIRED:
        return HINT_CREDENTIALS_EXPIRED
    if reason == _sigv4.UNKNOWN_KEY:
        return HINT_UNKNOWN_KEY
    return HINT_OTHER.format(reason=reason)


class TokenBucket:
    """A connection-rate limit: ``rate`` per second, at most ``burst`` at once.

    Args:
        rate: Tokens added per second (of the times passed to :meth:`take`).
        burst: The bucket's size; it starts full.
        now: The current time, in seconds.
    """

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._last = now

    def take(self, now: float) -> bool:
        """Take one token at time ``now`` (seconds); return False when the bucket is empty."""
        if now > self._last:
            self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
            self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class ReadyForQueryScanner:
    """Follows backend message boundaries and reports each ReadyForQuery status byte.

    Feed it everything the backend sends after AuthenticationOk, in order; it calls
    ``on_status`` with ``b"I"`` (idle), ``b"T"`` (in a transaction) or ``b"E"`` (in a
    failed transaction) after each ReadyForQuery. It copies no message bodies.

    Args:
        on_status: Called with the status byte of each ReadyForQuery.
    """

    def __init__(self, on_status: Callable[[bytes], None]) -> None:
        self._on_status = on_status
        self._header = bytearray()
        self._skip = 0
        self._want_status = False

    def feed(self, data: bytes) -> None:
        """Scan the next bytes of the backend's stream."""
        i, n = 0, len(data)
        while i < n:
            if self._skip:
                if self._want_status:
                    self._want_status = False
                    self._on_status(data[i : i + 1])
                take = min(self._skip, n - i)
                i += take
                self._skip -= take
                continue
            need = _HEADER - len(self._header)
            self._header += data[i : i + need]
            i += need
            if len(self._header) == _HEADER:
                kind = bytes(self._header[:1])
                (length,) = struct.unpack("!I", self._header[1:])
                self._header.clear()
                self._skip = max(length - 4, 0)
                self._want_status = kind == b"Z" and self._skip > 0


async def sleep_emulated(clock: EmulatorClock, seconds: float) -> None:
    """Wait until ``seconds`` of emulated time have passed (sooner after ``clock.advance``)."""
    deadline = clock.now() + seconds
    while True:
        remaining = deadline - clock.now()
        if remaining <= 0:
            return
        await asyncio.sleep(min(remaining / clock.time_scale, _TICK))
