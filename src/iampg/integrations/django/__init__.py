"""Django ≥ 5.1 on IAM tokens: a DATABASES entry and a thin PostgreSQL backend.

``settings.py``::

    from iampg.integrations.django import database

    DATABASES = {
        "default": database(
            "postgresql://app@mydb.cluster-abc.us-east-1.rds.amazonaws.com/app",
            pool={"min_size": 0, "max_size": 4, "max_idle": 240.0},
        )
    }

The entry's ``ENGINE`` is this package: Django's own PostgreSQL backend, with a current
token as the password of every new connection. With ``pool`` (Django's native psycopg
pool), the pool's ``kwargs`` are evaluated per connection, so pooled connections opened
after the first token expired still authenticate. Importing this module imports no Django.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ParamSpec, TypeVar, overload

import psycopg

from iampg import _retry
from iampg._connecting import Target, prepare, sync_class
from iampg._defaults import pool_options
from iampg._lost import purge
from iampg.integrations import EndpointOrProvider

__all__ = ["ENGINE", "database", "retry_transaction"]

ENGINE = "iampg.integrations.django"
"""The value of ``DATABASES[...]["ENGINE"]`` for this backend."""

PROVIDER_OPTION = "iampg_provider"
"""The ``OPTIONS`` key that carries the token provider (set by :func:`database`)."""

# Endpoint fields that go into Django's own keys rather than OPTIONS.
_TOP_LEVEL = {"host": "HOST", "port": "PORT", "user": "USER", "dbname": "NAME"}


class ProviderRef:
    """Carries a :class:`iampg.TokenProvider` (and what it signs for) through Django's settings.

    Settings may be copied (Django's test runner deep-copies database settings); every copy
    refers to the same provider, whose lock and cache cannot be copied.
    """

    __slots__ = ("provider", "target")

    def __init__(self, target: Target) -> None:
        self.target = target
        self.provider = target.provider

    def __copy__(self) -> ProviderRef:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> ProviderRef:
        return self

    def __repr__(self) -> str:
        return f"ProviderRef({self.provider!r})"


def database(
    target: EndpointOrProvider,
    *,
    pool: bool | Mapping[str, Any] = False,
    options: Mapping[str, Any] | None = None,
    preset: str | None = None,
    allow_insecure: bool = False,
    **settings: Any,
) -> dict[str, Any]:
    """Return a ``DATABASES`` entry that connects to ``target`` with IAM tokens.

    Args:
        target: The endpoint (a provider is made for it) or the :class:`iampg.TokenProvider`
            to share.
        pool: ``True`` or a mapping of :class:`psycopg_pool.ConnectionPool` options
            (``min_size``, ``max_size``, ``max_idle`` and ``max_lifetime`` in seconds …) to
            use Django's native pool (Django ≥ 5.1; keep ``CONN_MAX_AGE`` at 0). Its
            ``connection_class`` is subclassed so that a refused token is forgotten. ``False``:
            one connection per request, each with a current token.
        options: Extra ``OPTIONS`` (``isolation_level``, ``server_side_binding``, libpq
            parameters …); they win over the endpoint's parameters, and are checked like
            :func:`iampg.connect`'s (the final ``OPTIONS`` again at every connection).
        preset: ``rds``, ``aurora-serverless`` (or ``aurora-express``) or ``dsql``; defaults
            to the endpoint's service. Its settings apply where the caller's say nothing: the
            ``connect_timeout``; for the native pool, :class:`iampg.ConnectionPool`'s
            (DSQL: ``max_lifetime`` 3300 s, under the one-hour cap; Aurora Serverless:
            ``min_size`` 0, ``max_size`` 4, ``max_idle`` 240 s, ``timeout`` 60 s); for both
            serverless services, ``CONN_HEALTH_CHECKS = True``, so a connection the service
            closed (the cap, an idle cut) is replaced before use, pooled or persistent.
        allow_insecure: Allow an ``sslmode`` that may send the token in plaintext to a
            non-loopback host.
        **settings: Other keys of the entry (``CONN_HEALTH_CHECKS``, ``TEST``,
            ``ATOMIC_REQUESTS`` …).

    Returns:
        The entry: ``ENGINE``, ``NAME``, ``USER``, ``HOST``, ``PORT`` and ``OPTIONS`` (with
        ``sslmode`` and the provider); ``PASSWORD`` stays empty.

    Raises:
        ConfigurationError: Bad endpoint or options.
    """
    connecting = prepare(target, None, preset, allow_insecure=allow_insecure)
    params = dict(connecting.params)
    connecting.merge(options)
    entry: dict[str, Any] = {"ENGINE": ENGINE, "PASSWORD": ""}
    entry.update({key: params.pop(name) for name, key in _TOP_LEVEL.items()})
    opts: dict[str, Any] = {**params, **(options or {}), PROVIDER_OPTION: ProviderRef(connecting)}
    if pool:
        given = {} if pool is True else dict(pool)
        pool_options = _service_pool(connecting, given)
        # The connection class checks what libpq receives and forgets a refused token, so the
        # pool's retry signs anew.
        base = pool_options.get("connection_class", psycopg.Connection)
        pool_options["connection_class"] = sync_class(base, connecting)
        opts["pool"] = pool_options
    entry["OPTIONS"] = opts
    if _server_closes_sessions(connecting):
        # DSQL's cap and Aurora Serverless's idle cut close sessions a pool or a persistent
        # connection still holds: Django checks a connection before reusing it.
        entry["CONN_HEALTH_CHECKS"] = True
    entry.update(settings)
    return entry


def _server_closes_sessions(connecting: Target) -> bool:
    """Tell whether the service closes sessions on its own (DSQL's cap, an idle cut)."""
    pool = connecting.defaults.pool
    return "max_lifetime" in pool or "max_idle" in pool


def _service_pool(connecting: Target, given: dict[str, Any]) -> dict[str, Any]:
    """Return Django's pool options: the preset's psycopg_pool settings under the caller's.

    The check at checkout is Django's (``CONN_HEALTH_CHECKS``), which passes ``check=`` to the
    pool itself: the preset's own check is left out.
    """
    options = pool_options(connecting.defaults, given)
    if "check" not in given:
        options.pop("check", None)
    return options


# -- transactions that run again after a conflict or a lost connection ----------------------

P = ParamSpec("P")
T = TypeVar("T")


@overload
def retry_transaction(
    fn: Callable[[], T],
    *,
    using: str | None = ...,
    attempts: int = ...,
    base: float = ...,
    cap: float = ...,
    idempotent: bool = ...,
) -> T: ...
@overload
def retry_transaction(
    fn: None = ...,
    *,
    using: str | None = ...,
    attempts: int = ...,
    base: float = ...,
    cap: float = ...,
    idempotent: bool = ...,
) -> Callable[[Callable[P, T]], Callable[P, T]]: ...
def retry_transaction(
    fn: Callable[[], T] | None = None,
    *,
    using: str | None = None,
    attempts: int = 5,
    base: float = 0.02,
    cap: float = 1.0,
    idempotent: bool = False,
) -> Any:
    """Run ``fn()`` in ``transaction.atomic``, again if it lost a race or its connection.

    :func:`iampg.retry_transaction` for Django: the conflict (``OC000``, ``OC001``,
    ``40001``) is found behind Django's :class:`django.db.utils.OperationalError` (its
    ``__cause__``), the transaction is rolled back and ``fn`` runs again, with exponential
    backoff and jitter (``base`` doubling up to ``cap`` seconds). A connection lost before
    ``COMMIT`` was sent (a failover, an idle cut, DSQL's one-hour cap) is dropped by Django,
    and the next attempt opens a new one (or takes one from the native pool); lost during
    ``COMMIT``, the outcome is unknown and the error is raised unless ``idempotent=True``.

    Each attempt is ``transaction.atomic(using=using, durable=True)``: a transaction of its
    own, so this cannot run inside another atomic block (``ATOMIC_REQUESTS`` included; Django
    raises :class:`RuntimeError`), where a conflict would have doomed the outer transaction.
    ``fn`` must be safe to repeat: no side effects outside the database.

    Without ``fn``, returns a decorator; the decorated function keeps its arguments::

        @retry_transaction(attempts=10)
        def transfer(source_id, target_id, amount): ...

    Args:
        fn: The transaction's work, called without arguments; its return value is returned.
        using: The database alias (default: ``"default"``).
        attempts: How many times to try at most.
        base: First backoff step in seconds.
        cap: Largest backoff step in seconds.
        idempotent: Also run again when the connection broke during ``COMMIT``.

    Raises:
        django.db.DatabaseError: The last attempt's error, or one that is not retryable.
        ConfigurationError: Bad ``attempts``, ``base`` or ``cap``.
    """
    _retry.check_options(attempts, base, cap)

    def once(work: Callable[[Any], T]) -> T:
        attempt = _Attempt(using)  # one per call: it holds that call's connection
        return _retry.run(
            attempt.transaction,
            work,
            replaceable=True,
            broken=attempt.broken,
            lost=attempt.lost,
            attempts=attempts,
            base=base,
            cap=cap,
            idempotent=idempotent,
        )

    return _retry.call_or_decorate(once, None if fn is None else lambda _: fn(), with_target=False)


class _Attempt:
    """Opens each attempt's durable atomic block; tells whether its connection was lost."""

    def __init__(self, using: str | None) -> None:
        self.using = using
        self.driver: Any = None

    def _connection(self) -> Any:
        from django.db import transaction  # noqa: PLC0415

        return transaction.get_connection(self.using)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Run one attempt inside ``transaction.atomic(using, durable=True)``."""
        from django.db import transaction  # noqa: PLC0415

        self.driver = None
        with transaction.atomic(using=self.using, durable=True):
            self.driver = self._connection().connection
            yield

    def broken(self) -> bool:
        """Tell whether the attempt's connection, open at its start, was lost.

        When the rollback after a failure fails too, Django drops the connection (and may
        open another at once); psycopg marks one whose server went away ``broken``.
        """
        if self.driver is None:
            return False
        return self._connection().connection is not self.driver or _gone(self.driver)

    def lost(self) -> None:
        """Before the next attempt, make sure it gets a working connection.

        A lost connection Django still holds is closed (Django would reuse it); a native pool
        then checks its idle connections: what killed one (a restart, a failover) often
        killed them all.
        """
        connection = self._connection()
        if connection.connection is not None and _gone(connection.connection):
            connection.close()
        if connection.settings_dict["OPTIONS"].get("pool"):
            purge(connection.pool)  # the pool this connection came from: it exists already


def _gone(driver: Any) -> bool:
    return bool(driver.closed or driver.broken)
