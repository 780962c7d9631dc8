"""TokenProvider: one cached IAM token per endpoint, shared by threads and event loops."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from iampg import _refresh
from iampg._endpoint import Endpoint
from iampg._signer import (
    CREDENTIAL_OPTIONS,
    DSQL_MAX_LIFETIME,
    RDS_TOKEN_LIFETIME,
    Clock,
    SignedToken,
    Signer,
)
from iampg.errors import ConfigurationError, TokenError

if TYPE_CHECKING:
    from types import TracebackType

    from typing_extensions import Self

__all__ = ["Clock", "RefreshStrategy", "SignedToken", "Signer", "TokenProvider", "TokenStats"]

logger = logging.getLogger("iampg.tokens")

RefreshStrategy = Literal["lazy", "ahead"]
"""``lazy``: the caller that finds the token due refreshes it (default; right for Lambda and
other frozen CPUs). ``ahead``: a background thread refreshes it before it is due."""

_AHEAD_MAX_SLEEP = 60.0  # the background refresher re-checks at least this often (seconds)
_CREDENTIALS_RETRY = 30.0  # a refused token re-fetches credentials at most this often (seconds)


# TokenStats is a named tuple, not a dataclass: making a dataclass at import costs ~1 ms,
# and `import iampg` is on every cold start (benchmarks/cold.py).
class TokenStats(NamedTuple):
    """What a provider has done so far (an immutable named tuple).

    Attributes:
        hits: Tokens served from the cache (counted without a lock: may under-count).
        misses: Calls that found no usable token and had to wait for one.
        refreshes: Successful signings.
        failures: Failed signings.
        last_refresh_duration: Seconds the last successful signing took, or ``None``.
        expires_in: Seconds until the cached token stops working, or ``None`` if none is
            cached.
        refresh_in: Seconds until the cached token is due for refresh, or ``None``.
    """

    hits: int
    misses: int
    refreshes: int
    failures: int
    last_refresh_duration: float | None
    expires_in: float | None
    refresh_in: float | None


class _Cached:
    """The cached token (never in a repr) and when it is due and when it stops working."""

    __slots__ = ("refresh_at", "token", "valid_until")

    def __init__(self, token: str, refresh_at: float, valid_until: float) -> None:
        self.token = token
        self.refresh_at = refresh_at
        self.valid_until = valid_until


class TokenProvider:
    """Mint, cache and refresh IAM authentication tokens for one endpoint.

    A token is reused until ``refresh_buffer`` seconds before it stops working: its own
    lifetime (900 s for RDS) or the expiry of the temporary credentials that signed it,
    whichever comes first. When it is due, the first caller signs a new one while every other
    thread or task waits for that result: many callers at once cause one signing.

    If signing fails while the current token still works, the current token is served, one
    WARNING is logged and signing is retried with exponential backoff; once no valid token
    remains, :class:`iampg.TokenError` is raised with the cause chained.

    The token is handed over only when a *new* connection authenticates: sessions that are
    already open outlive it.

    Credentials come from ``signer``, or from an :class:`iampg.AwsSigner` made from the
    credential arguments (shared with every provider given the same ones); with none, from
    botocore's default chain, except that plain environment keys (``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, optional ``AWS_SESSION_TOKEN``), which that chain would use
    first anyway, are signed with a standard-library signer that makes byte-identical tokens
    without importing botocore.

    Args:
        endpoint: The endpoint to sign for (or anything :meth:`Endpoint.parse` accepts).
        session: A ``boto3.Session`` or ``botocore.session.Session`` whose credentials sign.
        profile: A profile from the AWS config files.
        aws_access_key_id: A static access key id (with ``aws_secret_access_key``).
        aws_secret_access_key: Its secret key.
        aws_session_token: The session token of temporary static keys.
        role_arn: A role to assume; its credentials refresh themselves.
        external_id: The external id for ``role_arn``.
        role_session_name: The role session name (default ``iampg``).
        role_duration: Seconds per role session, 900 to 43 200 (default 3600).
        sts_region: The region of the STS endpoint for ``role_arn`` (default: the token's).
        sts_endpoint_url: A custom STS endpoint for ``role_arn`` (a VPC endpoint).
        signer: A custom :class:`Signer` instead of the credential arguments.
        lifetime: Seconds a DSQL token lasts, 1 to 604 800 (default 900). RDS tokens always
            last 900 s.
        refresh_buffer: Seconds before expiry at which a token is replaced (default 300).
        refresh: ``"lazy"`` (default) or ``"ahead"``; see :data:`RefreshStrategy`. Call
            :meth:`close` (or use ``with``) to stop an ``ahead`` provider's thread.
        clock: The monotonic clock used for every deadline (default :func:`time.monotonic`).

    Raises:
        ConfigurationError: Conflicting or invalid arguments.
    """

    def __init__(
        self,
        endpoint: Endpoint | str,
        *,
        session: Any = None,
        profile: str | None = None,
        aws_access_key_id: str | None = None,
        aws_secret_access_key: str | None = None,
        aws_session_token: str | None = None,
        role_arn: str | None = None,
        external_id: str | None = None,
        role_session_name: str | None = None,
        role_duration: int | None = None,
        sts_region: str | None = None,
        sts_endpoint_url: str | None = None,
        signer: Signer | None = None,
        lifetime: float | None = None,
        refresh_buffer: float = 300.0,
        refresh: RefreshStrategy = "lazy",
        clock: Clock = time.monotonic,
    ) -> None:
        # The credential options, by the names declared once in iampg._signer (read before
        # any other local exists); they go to AwsSigner unchanged.
        arguments = locals()
        credential_args = {name: arguments[name] for name in CREDENTIAL_OPTIONS}
        self._endpoint = Endpoint.parse(endpoint)
        given = sorted(k for k, v in credential_args.items() if v is not None)
        if signer is not None and given:
            raise ConfigurationError(f"pass either signer= or {', '.join(given)}, not both")
        self._lifetime = _lifetime(self._endpoint, lifetime)
        if not refresh_buffer >= 0:
            raise ConfigurationError(
                f"refresh_buffer must be zero or more seconds, not {refresh_buffer!r}"
            )
        if refresh not in ("lazy", "ahead"):
            raise ConfigurationError(f"refresh must be 'lazy' or 'ahead', not {refresh!r}")
        if signer is None and not given:
            # Plain environment keys (AWS Lambda, CI, containers): the standard-library signer
            # makes the same tokens as botocore without importing it (~190 ms of cold start).
            from iampg._sigv4 import EnvSigner  # noqa: PLC0415

            signer = EnvSigner.from_environ(os.environ, endpoint=self._endpoint)
        if signer is None:
            from iampg._aws import AwsSigner  # noqa: PLC0415 -- botocore is imported late

            signer = AwsSigner.shared(**credential_args)
        self._signer = signer
        self._buffer = float(refresh_buffer)
        self._clock: Clock = clock
        self._lock = threading.Lock()
        self._cached: _Cached | None = None
        self._failures = 0
        self._retry_at = 0.0
        self._hits = 0
        self._misses = 0
        self._refreshes = 0
        self._failed = 0
        self._last_duration: float | None = None
        self._credentials_refreshed_at: float | None = None
        # One in-flight refresh per event loop, so tasks queue on a future, not on threads.
        self._inflight: dict[asyncio.AbstractEventLoop, asyncio.Future[str]] = {}
        self._strategy: RefreshStrategy = refresh
        self._stop = threading.Event()
        self._ahead: threading.Thread | None = None
        if refresh == "ahead":
            self._start_ahead()
        _providers.add(self)

    def _start_ahead(self) -> None:
        self._ahead = threading.Thread(
            target=self._refresh_ahead,
            name=f"iampg-refresh-{self._endpoint.host}",
            daemon=True,
        )
        self._ahead.start()

    def _after_fork_in_child(self) -> None:
        """Make the copy a forked child inherited usable: only the forking thread survived.

        A lock held by another thread of the parent (signing at the moment of the fork)
        would never be released: the child gets new locks, forgets in-flight refreshes of
        the parent's event loops, and restarts the ahead refresher that did not survive.
        The cached token still works (a token is not tied to a process).
        """
        self._lock = threading.Lock()
        self._inflight = {}
        if self._ahead is not None and not self._stop.is_set():
            self._stop = threading.Event()
            self._start_ahead()

    @property
    def endpoint(self) -> Endpoint:
        """The endpoint tokens are signed for."""
        return self._endpoint

    @property
    def refresh_strategy(self) -> RefreshStrategy:
        """``lazy`` or ``ahead``."""
        return self._strategy

    def __repr__(self) -> str:
        return f"TokenProvider({self._endpoint!r}, signer={self._signer!r})"

    # -- the token ------------------------------------------------------------------------

    def token(self) -> str:
        """Return a token that stays valid for at least the refresh buffer, when possible.

        Blocks only when a new token must be signed (microseconds with environment keys,
        about 0.1 ms with botocore and cached credentials, longer when botocore has to fetch
        credentials), and only the caller that signs: while it does, other callers get the
        current token if it still works.

        Raises:
            TokenError: No valid token is cached and signing failed.
        """
        cached = self._cached
        if cached is not None and self._clock() < cached.refresh_at:
            self._hits += 1
            return cached.token
        return self._refresh()

    async def atoken(self) -> str:
        """Return a token like :meth:`token` without blocking the event loop.

        A cached token is returned at once, also while it is being refreshed if it still
        works; signing runs in a worker thread and shares the cache and the single refresh
        with threads using :meth:`token`. Tasks of one loop that have no valid token wait for
        a single worker.

        Raises:
            TokenError: No valid token is cached and signing failed.
        """
        cached = self._cached
        if cached is not None and self._clock() < cached.refresh_at:
            self._hits += 1
            return cached.token
        loop = asyncio.get_running_loop()
        future = self._inflight.get(loop)
        if future is None:
            future = loop.run_in_executor(None, self._refresh)
            self._inflight[loop] = future
            future.add_done_callback(lambda f: self._refresh_done(loop, f))
        if cached is not None and self._clock() < cached.valid_until:
            # Due for refresh but still working: the refresh runs on; nobody waits for it.
            self._hits += 1
            return cached.token
        self._misses += 1
        # Cancelling one waiter must not cancel the refresh the others wait for.
        return await asyncio.shield(future)

    def _refresh_done(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[str]) -> None:
        if self._inflight.get(loop) is future:
            del self._inflight[loop]
        if not future.cancelled():
            future.exception()  # retrieved: each waiter re-raises it on its own

    def invalidate(self, token: str | None = None) -> None:
        """Forget the cached token so the next caller signs a new one.

        Call it after the server refused the token. Pass the refused ``token`` to forget it
        only if it is still the cached one (a newer token is kept). A refused token that was
        the current one also makes the signer fetch its credentials again (when it has a
        ``refresh_credentials()`` method, as :class:`iampg.AwsSigner` does), so keys that were
        revoked or rotated are not signed with until they expire; at most once every
        30 seconds, so a refusal for another reason does not hammer the credentials service.
        """
        refresh: Callable[[], None] | None = None
        with self._lock:
            cached = self._cached
            if cached is not None and (token is None or token == cached.token):
                logger.debug("token invalidated for %s", self._endpoint.host)
                self._cached = None
                self._retry_at = 0.0
                now = self._clock()
                if token is not None and (
                    self._credentials_refreshed_at is None
                    or now - self._credentials_refreshed_at >= _CREDENTIALS_RETRY
                ):
                    refresh = getattr(self._signer, "refresh_credentials", None)
                    self._credentials_refreshed_at = now
        if refresh is not None:
            logger.info(
                "token refused by %s; fetching the credentials again before the next token",
                self._endpoint.host,
            )
            try:
                refresh()
            except Exception as exc:  # noqa: BLE001 -- the next signing reports the failure
                logger.debug("dropping the signer's credentials failed: %s", type(exc).__name__)

    def stats(self) -> TokenStats:
        """Return the provider's counters and the cached token's remaining time."""
        cached = self._cached
        now = self._clock()
        return TokenStats(
            hits=self._hits,
            misses=self._misses,
            refreshes=self._refreshes,
            failures=self._failed,
            last_refresh_duration=self._last_duration,
            expires_in=None if cached is None else cached.valid_until - now,
            refresh_in=None if cached is None else cached.refresh_at - now,
        )

    # -- refreshing -----------------------------------------------------------------------

    def _refresh(self, *, background: bool = False) -> str:
        cached = self._cached
        if cached is not None and self._clock() < cached.valid_until:
            if not self._lock.acquire(blocking=False):
                # Another caller is signing and the current token still works: don't wait.
                self._hits += 1
                return cached.token
        else:
            self._lock.acquire()
        try:
            return self._refresh_locked(background=background)
        finally:
            self._lock.release()

    def _refresh_locked(self, *, background: bool) -> str:
        now = self._clock()
        cached = self._cached
        if cached is not None:
            if now < cached.refresh_at:
                if not background:
                    self._misses += 1
                    logger.debug("token refreshed by another caller; reusing it")
                return cached.token
            if now < self._retry_at and now < cached.valid_until:
                logger.debug("token due but backing off after a failure; reusing it")
                return cached.token
        if not background:
            self._misses += 1
        started = time.perf_counter()
        try:
            signed = self._signer.sign(self._endpoint, self._lifetime)
        except Exception as exc:  # noqa: BLE001 -- any failure: keep a valid token
            return self._signing_failed(exc, cached)
        self._last_duration = time.perf_counter() - started
        until = _refresh.valid_until(now, signed.lifetime, signed.credentials_ttl)
        cached = _Cached(signed.token, _refresh.refresh_at(now, until, self._buffer), until)
        self._cached = cached
        self._failures = 0
        self._retry_at = 0.0
        self._refreshes += 1
        logger.debug(
            "new token for %s@%s: valid for %.0f s%s, refresh in %.0f s",
            self._endpoint.user,
            self._endpoint.host,
            cached.valid_until - now,
            " (capped by the credentials' expiry)"
            if signed.credentials_ttl is not None and signed.credentials_ttl < signed.lifetime
            else "",
            cached.refresh_at - now,
        )
        return cached.token

    def _signing_failed(self, exc: Exception, cached: _Cached | None) -> str:
        from iampg._aws import describe_signing_error  # noqa: PLC0415

        self._failures += 1
        self._failed += 1
        now = self._clock()
        reason = describe_signing_error(exc)
        if cached is not None and now < cached.valid_until:
            delay = _refresh.backoff(self._failures)
            self._retry_at = now + delay
            log = logger.warning if self._failures == 1 else logger.debug
            log(
                "token refresh for %s failed (%s); serving the current token, valid for "
                "%.0f s more; retrying in %.1f s",
                self._endpoint.host,
                reason,
                cached.valid_until - now,
                delay,
            )
            return cached.token
        self._cached = None
        raise TokenError(
            f"cannot get an IAM token for {self._endpoint.user}@{self._endpoint.host} "
            f"(region {self._endpoint.region}): {reason}"
        ) from exc

    def _refresh_ahead(self) -> None:
        """Keep the token fresh in the background until :meth:`close`."""
        while not self._stop.is_set():
            cached = self._cached
            wait = 0.0 if cached is None else cached.refresh_at - self._clock()
            if wait <= 0:
                try:
                    self._refresh(background=True)
                except TokenError:
                    logger.debug("background refresh found no valid token; will retry")
                cached = self._cached
                retry = self._retry_at - self._clock() if self._failures else 0.0
                if cached is None or retry > 0:
                    wait = max(retry, _refresh.backoff(self._failures))
                else:
                    continue
            self._stop.wait(min(wait, _AHEAD_MAX_SLEEP))

    def close(self) -> None:
        """Stop the background refresher of an ``ahead`` provider; the cache stays usable."""
        self._stop.set()
        thread = self._ahead
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self._ahead = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# Every provider, for the fork handler below (weakly: a provider no one uses may go).
_providers: weakref.WeakSet[TokenProvider] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for provider in list(_providers):
        provider._after_fork_in_child()  # noqa: SLF001 -- the module's own class


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _lifetime(endpoint: Endpoint, lifetime: float | None) -> float:
    """Validate a token lifetime for the endpoint's service."""
    if lifetime is None:
        return RDS_TOKEN_LIFETIME
    if endpoint.kind != "dsql":
        if lifetime != RDS_TOKEN_LIFETIME:
            raise ConfigurationError(
                f"RDS tokens always last {RDS_TOKEN_LIFETIME:.0f} s: lifetime= applies to DSQL only"
            )
        return RDS_TOKEN_LIFETIME
    if not 1 <= lifetime <= DSQL_MAX_LIFETIME or lifetime != int(lifetime):
        raise ConfigurationError(
            f"DSQL token lifetime must be a whole number of seconds from 1 to "
            f"{DSQL_MAX_LIFETIME:.0f}, not {lifetime!r}"
        )
    return float(lifetime)
