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

from collections.abc import Mapping
from typing import Any

import psycopg

from iampg._connecting import Target, prepare, sync_class
from iampg.integrations import EndpointOrProvider

__all__ = ["ENGINE", "database"]

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
        preset: ``rds``, ``aurora-serverless`` (or ``aurora-express``) or ``dsql``: the
            service's ``connect_timeout``; defaults to the endpoint's service.
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
        pool_options = {} if pool is True else dict(pool)
        # The connection class checks what libpq receives and forgets a refused token, so the
        # pool's retry signs anew.
        base = pool_options.get("connection_class", psycopg.Connection)
        pool_options["connection_class"] = sync_class(base, connecting)
        opts["pool"] = pool_options
    entry["OPTIONS"] = opts
    entry.update(settings)
    return entry
