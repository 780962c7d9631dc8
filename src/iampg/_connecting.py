"""The one place an IAM connection is opened: parameters merged and checked, refusals explained.

Every entry point (:func:`iampg.connect`, the pools, the SQLAlchemy, Django and asyncpg
integrations, the ``iampg`` command) builds its connection parameters here and checks the
*final* ones, after the caller's own arguments were merged in: a token is a bearer
credential, so it must not go unencrypted to another machine, nor to a host, address or
port other than the one it was signed for.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import time
import warnings
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from iampg import _conninfo, _refresh
from iampg._defaults import ServiceDefaults, canonical_preset, defaults_for
from iampg._diagnose import (
    authentication_error,
    certificate_error,
    failure_kind,
    transient_reason,
)
from iampg._endpoint import Endpoint
from iampg._options import option
from iampg._tokens import TokenProvider
from iampg.errors import ConfigurationError

if TYPE_CHECKING:
    import psycopg

    from iampg import _narrow

__all__ = [
    "Attempts",
    "Secret",
    "Target",
    "aopen_verified",
    "async_class",
    "check",
    "check_extra",
    "connect_params",
    "explain",
    "final_params",
    "open_verified",
    "prepare",
    "preset_argument",
    "resolve",
    "sync_class",
    "with_root",
]

logger = logging.getLogger("iampg.pool")

T = TypeVar("T")
CT = TypeVar("CT", bound="psycopg.Connection[Any]")
ACT = TypeVar("ACT", bound="psycopg.AsyncConnection[Any]")

INSECURE_SSLMODES = frozenset({"disable", "allow", "prefer"})
_VERIFYING = frozenset({"verify-ca", "verify-full"})

# Arguments of psycopg's Connection.connect that are not libpq parameters.
_NOT_LIBPQ = frozenset(
    {"autocommit", "prepare_threshold", "context", "row_factory", "cursor_factory", "conninfo"}
)

# What a caller may not add to the parameters of an IAM connection.
_REFUSED_EXTRA = {
    "password": "iampg supplies the IAM token as the password: remove password=",
    "passfile": "iampg supplies the IAM token as the password: remove passfile=",
    "service": (
        "a service file could send the token elsewhere: pass its host, port, user and dbname "
        "in the endpoint instead of service="
    ),
}


class Secret:
    """Hold a token so that a frame's locals (tracebacks, debuggers) show no secret."""

    __slots__ = ("value",)

    def __init__(self, value: str | None) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "Secret(<hidden>)"


# -- endpoint and parameters --------------------------------------------------------------


def resolve(
    endpoint: Endpoint | str | TokenProvider | None, provider: TokenProvider | None
) -> tuple[Endpoint, TokenProvider]:
    """Return the endpoint to dial and the provider that signs for it.

    ``endpoint`` may add connection options (``sslmode``, ``hostaddr`` …) to the provider's
    endpoint, but must not name another host, port, user, region or service. A
    :class:`TokenProvider` in its place stands for its own endpoint and itself as provider.

    Raises:
        ConfigurationError: Neither was given, they disagree on what is signed, or a provider
            given first and another one given as ``provider``.
    """
    if isinstance(endpoint, TokenProvider):
        if provider is not None and provider is not endpoint:
            raise ConfigurationError(
                "a TokenProvider given in place of the endpoint and a different one as "
                "provider=: pass one of them"
            )
        return endpoint.endpoint, endpoint
    if provider is None:
        if endpoint is None:
            raise ConfigurationError("pass an endpoint (host name, URL or Endpoint) or provider=")
        ep = Endpoint.parse(endpoint)
        return ep, TokenProvider(ep)
    if endpoint is None:
        return provider.endpoint, provider
    ep = Endpoint.parse(endpoint)
    signed = provider.endpoint
    for name in ("host", "port", "user", "region", "kind"):
        if getattr(ep, name) != getattr(signed, name):
            raise ConfigurationError(
                f"the endpoint's {name} ({getattr(ep, name)!r}) differs from the one the "
                f"provider signs for ({getattr(signed, name)!r}): pass one of them"
            )
    return ep, provider


DEFAULT_ROOT_SOURCE = "libpq's default root certificate file"
_DEFAULT_ROOT_CERT = Path("~/.postgresql/root.crt")


class RootFile(NamedTuple):
    """The root certificate file libpq reads: its path and where that path comes from."""

    path: str
    source: str  # "sslrootcert", "PGSSLROOTCERT" or DEFAULT_ROOT_SOURCE


def libpq_root_file(params: Mapping[str, Any]) -> RootFile:
    """Return the root certificate file libpq would read for ``params``.

    ``sslrootcert``, else ``PGSSLROOTCERT``, else ``~/.postgresql/root.crt`` (``HOME``
    first, as libpq); an empty value counts as none, as in libpq. Where that file exists,
    libpq verifies the server's chain against it whatever the ``sslmode`` (``require`` then
    behaves as ``verify-ca``): the doctor's TLS check and the proxy's upstream TLS do too.
    """
    given, source = params.get("sslrootcert"), "sslrootcert"
    if given is None:
        given, source = os.environ.get("PGSSLROOTCERT"), "PGSSLROOTCERT"
    if given:
        return RootFile(str(given), source)
    return RootFile(str(_DEFAULT_ROOT_CERT.expanduser()), DEFAULT_ROOT_SOURCE)


def connect_params(endpoint: Endpoint, *, allow_insecure: bool = False) -> dict[str, str]:
    """Return the libpq parameters for ``endpoint``, without the password.

    TLS is verified unless asked otherwise: every service gets ``sslmode=verify-full`` with
    ``sslrootcert`` set to iampg's shipped CA file for the endpoint (or the file
    ``IAMPG_SSLROOTCERT`` names), which every libpq can read. An ``sslrootcert`` given wins;
    ``sslmode=require`` is an explicit opt-out (encrypted, not authenticated). A token is a
    bearer credential, so a ``sslmode`` that may send it in plaintext (``disable``,
    ``allow``, ``prefer``) is refused towards anything but loopback unless
    ``allow_insecure`` is true.

    Raises:
        ConfigurationError: An insecure ``sslmode`` towards a non-loopback host, or
            ``IAMPG_SSLROOTCERT`` names a file that does not exist.
    """
    params = dict(endpoint)
    params.setdefault("sslmode", "verify-full")
    if params["sslmode"] in _VERIFYING and "sslrootcert" not in params:
        from iampg import _trust  # noqa: PLC0415

        params["sslrootcert"] = str(_trust.root_file(endpoint))
    check(endpoint, params, allow_insecure=allow_insecure)
    return params


def is_loopback(address: str) -> bool:
    """Tell whether ``address`` (a host name or IP address) is this machine."""
    if address.strip().lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip()).is_loopback
    except ValueError:
        return False


def _same(name: str, value: object, expected: object) -> bool:
    """Compare a host, hostaddr or port the way libpq would read them."""
    if name == "hostaddr":
        given = str(value).strip() if value not in (None, "") else None
        if given is None or expected is None:
            return given == expected
        try:
            return ipaddress.ip_address(given) == ipaddress.ip_address(str(expected))
        except ValueError:
            return False
    if value is None:
        return False
    text = str(value).strip()
    return (text.lower().rstrip(".") if name == "host" else text) == str(expected)


def final_params(conninfo: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Return the libpq parameters psycopg builds from ``conninfo`` and connect's ``kwargs``."""
    nested = kwargs.get("conninfo")
    libpq = {k: v for k, v in kwargs.items() if k not in _NOT_LIBPQ}
    base = {**_conninfo.parse(conninfo), **_conninfo.parse(nested or "")}
    return {**base, **{k: v for k, v in libpq.items() if v is not None}}


def check(endpoint: Endpoint, params: Mapping[str, Any], *, allow_insecure: bool) -> None:
    """Refuse final libpq parameters that could hand the token to anyone but ``endpoint``.

    ``params`` are what libpq will receive (without the password). ``host``, ``hostaddr`` and
    ``port`` must be the endpoint's: the token is signed for them. ``sslmode`` must encrypt
    (``require``, ``verify-ca``, ``verify-full``) unless the address dialled is loopback or
    ``allow_insecure`` is true; a missing ``sslmode`` is libpq's default, ``prefer``.

    Raises:
        ConfigurationError: What would be sent elsewhere, and what to do instead.
    """
    expected = {"host": endpoint.host, "hostaddr": endpoint.hostaddr, "port": str(endpoint.port)}
    for name, value in expected.items():
        given = params.get(name)
        if not _same(name, given, value):
            raise ConfigurationError(
                f"{name}={given!r} differs from the endpoint the token is signed for "
                f"({_where(endpoint)}): a token must only go to that endpoint; use another "
                f"Endpoint (e.g. Endpoint.parse(..., {name}=...)) instead of overriding {name}"
            )
    sslmode = params.get("sslmode") or "prefer"
    if sslmode in INSECURE_SSLMODES and not endpoint.is_loopback and not allow_insecure:
        raise ConfigurationError(
            f"sslmode={sslmode} could send the IAM token unencrypted to {endpoint.dialled}: "
            f"use sslmode=require or verify-full (or {option('allow_insecure')} if you must)"
        )


def check_extra(extra: Mapping[str, Any] | None) -> None:
    """Refuse a caller's connection arguments that would replace or redirect the token.

    Raises:
        ConfigurationError: ``password``, ``passfile`` or ``service`` was given.
    """
    for key in extra or ():
        if key in _REFUSED_EXTRA:
            raise ConfigurationError(f"{key} given: {_REFUSED_EXTRA[key]}")


def _where(endpoint: Endpoint) -> str:
    via = f" via {endpoint.hostaddr}" if endpoint.hostaddr else ""
    return f"{endpoint.host}:{endpoint.port}{via}"


# -- presets ------------------------------------------------------------------------------


def preset_argument(preset: str | None, profile: str | None, *, stacklevel: int = 3) -> str | None:
    """Return the preset asked for with ``preset=`` or the deprecated ``profile=``.

    Raises:
        ConfigurationError: Both were given and disagree, or an unknown preset.
    """
    if profile is None:
        return None if preset is None else canonical_preset(preset)
    warnings.warn(
        "profile= is deprecated for service presets: use preset= (profile means an AWS "
        "config profile in iampg)",
        DeprecationWarning,
        stacklevel=stacklevel,
    )
    if preset is not None and canonical_preset(preset) != canonical_preset(profile):
        raise ConfigurationError(
            f"preset={preset!r} and profile={profile!r} disagree: pass preset= only"
        )
    return canonical_preset(profile)


# -- what an entry point needs ------------------------------------------------------------


class Target(NamedTuple):
    """Everything an entry point needs to open IAM connections to one endpoint."""

    endpoint: Endpoint
    provider: TokenProvider
    defaults: ServiceDefaults
    params: dict[str, str]
    allow_insecure: bool

    def merge(self, extra: Mapping[str, Any] | None) -> dict[str, Any]:
        """Return the endpoint's parameters with the caller's on top, checked; no password.

        Raises:
            ConfigurationError: See :func:`check` and :func:`check_extra`.
        """
        check_extra(extra)
        extra = extra or {}
        merged: dict[str, Any] = {**self.params, **extra}
        if (
            extra.get("sslmode") not in (None, *_VERIFYING)
            and "sslrootcert" not in extra
            and "sslrootcert" not in self.endpoint.params
        ):
            # sslmode=require given: the opt-out, not libpq's verify-ca with iampg's CA file.
            merged.pop("sslrootcert", None)
        self.check(final_params("", merged))
        return merged

    def check(self, params: Mapping[str, Any]) -> None:
        """Check final libpq parameters; see :func:`check`."""
        check(self.endpoint, params, allow_insecure=self.allow_insecure)


def prepare(
    endpoint: Endpoint | str | TokenProvider | None,
    provider: TokenProvider | None,
    preset: str | None,
    *,
    allow_insecure: bool,
) -> Target:
    """Resolve the endpoint and provider, pick the preset and build the base parameters.

    Raises:
        ConfigurationError: Bad endpoint, preset or options.
    """
    ep, prov = resolve(endpoint, provider)
    defaults = defaults_for(ep, preset)
    params = connect_params(ep, allow_insecure=allow_insecure)
    params.setdefault("connect_timeout", str(defaults.connect_timeout))
    return Target(ep, prov, defaults, params, allow_insecure)


# -- the CA file each attempt verifies with ----------------------------------------------


def with_root(params: Mapping[str, Any], rootcert: str | None) -> dict[str, Any]:
    """Return ``params`` with ``sslrootcert`` replaced by ``rootcert`` (unless None)."""
    return dict(params) if rootcert is None else {**params, "sslrootcert": rootcert}


def _settle(choice: _narrow.Choice, exc: BaseException) -> bool:
    """Record how a narrowed attempt failed; tell whether to connect again with the whole file.

    A refused token proves the certificate verified: libpq sends a password only then.
    """
    if isinstance(exc, Exception) and choice.refusal(exc):
        choice.refused()
        return True
    if isinstance(exc, Exception) and failure_kind(exc) == "token":
        choice.verified()
    else:
        choice.released()
    return False


def open_verified(open_: Callable[[str | None], T], params: Mapping[str, Any]) -> T:
    """Call ``open_`` with the one-CA file that verifies the server, else None (the whole file).

    ``params`` are the final libpq parameters. When :mod:`iampg._narrow` knows (or is
    finding out) which certificate of the ``sslrootcert`` file verifies this server,
    ``open_`` gets that certificate's file; if the server's certificate does not verify with
    it (before any password is sent), ``open_`` is called again with None: the whole file,
    as without narrowing.
    """
    from iampg import _narrow  # noqa: PLC0415 -- loaded at the first connect, not at import

    choice = _narrow.choose(params)
    if choice is None:
        return open_(None)
    try:
        conn = open_(choice.file)
    except BaseException as exc:
        if not _settle(choice, exc):
            raise
    else:
        choice.verified()
        return conn
    return open_(None)


async def aopen_verified(
    open_: Callable[[str | None], Awaitable[T]], params: Mapping[str, Any]
) -> T:
    """The asynchronous twin of :func:`open_verified`."""
    from iampg import _narrow  # noqa: PLC0415 -- loaded at the first connect, not at import

    choice = _narrow.choose(params)
    if choice is None:
        return await open_(None)
    try:
        conn = await open_(choice.file)
    except BaseException as exc:
        if not _settle(choice, exc):
            raise
    else:
        choice.verified()
        return conn
    return await open_(None)


# -- refusals and retries -----------------------------------------------------------------


def explain(
    error: psycopg.OperationalError,
    provider: TokenProvider,
    token: object,
    params: Mapping[str, Any] | None = None,
) -> Exception:
    """Forget a refused token; return the error to raise (explained if iampg knows why).

    ``token`` is the token that was sent (a :class:`Secret`, a string, or None if unknown);
    ``params`` the libpq parameters used, which say which CA file failed to verify the server.
    """
    kind = failure_kind(error)
    if kind is None:
        return error
    if kind == "certificate":
        rootcert = (params or {}).get("sslrootcert")
        return certificate_error(
            error, provider.endpoint, None if rootcert is None else str(rootcert)
        )
    if kind == "token" and isinstance(token, Secret) and token.value is not None:
        provider.invalidate(token.value)
    elif kind == "token" and isinstance(token, str):
        provider.invalidate(token)
    return authentication_error(error, provider.endpoint, kind)


class Attempts:
    """What to do after a failed connect: retry at once, wait and retry, or raise."""

    def __init__(
        self, target: Target, wait: float | None, params: Mapping[str, Any] | None = None
    ) -> None:
        self._params = params
        self._endpoint = target.endpoint
        self._provider = target.provider
        self._defaults = target.defaults
        self._wait = target.defaults.wait if wait is None else wait
        self._refused = False
        self._failures = 0
        self._deadline: float | None = None

    def failed(self, exc: psycopg.OperationalError, token: Secret) -> float:
        """Return the seconds to wait before the next attempt, or raise the error to surface."""
        kind = failure_kind(exc)
        if kind is not None:
            error = explain(exc, self._provider, token, self._params)
            if kind == "token" and not self._refused:
                self._refused = True
                logger.info(
                    "token refused by %s; retrying once with a new token", self._endpoint.host
                )
                return 0.0
            raise error from exc
        reason = transient_reason(exc, timeouts=self._defaults.retry_timeouts)
        if reason is None or self._wait <= 0:
            raise exc
        now = time.monotonic()
        if self._deadline is None:
            self._deadline = now + self._wait
            logger.info(
                "%s is not accepting connections yet (%s); retrying for up to %g s",
                self._endpoint.host,
                reason,
                self._wait,
            )
        if now >= self._deadline:
            from iampg.errors import UnavailableError  # noqa: PLC0415 -- made on first use

            raise UnavailableError(
                f"{self._endpoint.host} did not accept a connection within {self._wait:g} s: "
                f"{reason}. Retry later, or pass a longer wait="
            ) from exc
        self._failures += 1
        step = _refresh.backoff(self._failures, base=0.5, cap=5.0)
        return min(step, self._deadline - now)


def sync_class(base: type[CT], target: Target) -> type[CT]:
    """Subclass ``base``: check the final parameters, forget a refused token, explain it.

    Pools (psycopg_pool's and Django's) open connections with
    ``connection_class.connect(conninfo, **kwargs)``: what this checks is exactly what libpq
    receives, whatever ``kwargs`` returned.
    """
    import psycopg  # noqa: PLC0415 -- psycopg loads when a psycopg helper is used

    class IamConnection(base):  # type: ignore[valid-type,misc]
        @classmethod
        def connect(cls, conninfo: str = "", **kwargs: Any) -> Any:
            token = Secret(kwargs.pop("password", None))
            params = final_params(conninfo, kwargs)
            target.check(params)
            base_connect = super().connect
            try:
                return open_verified(
                    lambda root: base_connect(
                        conninfo, **with_root(kwargs, root), password=token.value
                    ),
                    params,
                )
            except psycopg.OperationalError as exc:
                error = explain(exc, target.provider, token, params)
                if error is exc:
                    raise
                raise error from exc

    IamConnection.__name__ = IamConnection.__qualname__ = f"Iam{base.__name__}"
    return IamConnection


def async_class(base: type[ACT], target: Target) -> type[ACT]:
    """The asynchronous twin of :func:`sync_class`."""
    import psycopg  # noqa: PLC0415 -- psycopg loads when a psycopg helper is used

    class IamAsyncConnection(base):  # type: ignore[valid-type,misc]
        @classmethod
        async def connect(cls, conninfo: str = "", **kwargs: Any) -> Any:
            token = Secret(kwargs.pop("password", None))
            params = final_params(conninfo, kwargs)
            target.check(params)
            base_connect = super().connect
            try:
                return await aopen_verified(
                    lambda root: base_connect(
                        conninfo, **with_root(kwargs, root), password=token.value
                    ),
                    params,
                )
            except psycopg.OperationalError as exc:
                error = explain(exc, target.provider, token, params)
                if error is exc:
                    raise
                raise error from exc

    IamAsyncConnection.__name__ = IamAsyncConnection.__qualname__ = f"Iam{base.__name__}"
    return IamAsyncConnection
