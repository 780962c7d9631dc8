"""Django's PostgreSQL backend with a current IAM token for every new connection."""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from django.core.exceptions import ImproperlyConfigured
from django.db.backends.postgresql import base

from iampg._connecting import Secret, Target, explain, final_params, open_verified, with_root
from iampg._tokens import TokenProvider
from iampg.integrations.django import PROVIDER_OPTION, ProviderRef

__all__ = ["DatabaseWrapper"]

logger = logging.getLogger("iampg.integrations.django")


class _TokenKwargs(dict[str, Any]):
    """Connection arguments that are also a callable giving them with a current token.

    Django builds its pool with ``ConnectionPool(kwargs=<these>)``; psycopg_pool calls a
    callable ``kwargs`` at every connection attempt, so each new pooled connection signs
    (or reuses a cached) token instead of the one current when the pool was made.
    """

    def __init__(self, params: dict[str, Any], provider: TokenProvider) -> None:
        super().__init__(params)
        self.provider = provider

    def __call__(self) -> dict[str, Any]:
        return {**self, "password": self.provider.token()}


class DatabaseWrapper(base.DatabaseWrapper):  # type: ignore[misc]
    """Django's PostgreSQL ``DatabaseWrapper``, authenticating with IAM tokens.

    Use it through :func:`iampg.integrations.django.database`, which sets
    ``ENGINE = "iampg.integrations.django"`` and puts the provider in ``OPTIONS``.
    """

    def _provider(self) -> TokenProvider:
        return self._target().provider

    def _target(self) -> Target:
        ref = self.settings_dict["OPTIONS"].get(PROVIDER_OPTION)
        if not isinstance(ref, ProviderRef):
            msg = (
                "this database has no iampg token provider: build its DATABASES entry with "
                "iampg.integrations.django.database(...)"
            )
            raise ImproperlyConfigured(msg)
        return ref.target

    def get_connection_params(self) -> dict[str, Any]:
        """Return Django's connection parameters with a current token as the password.

        The parameters (``OPTIONS`` included) are checked like :func:`iampg.connect`'s.
        """
        target = self._target()
        params: dict[str, Any] = super().get_connection_params()
        params.pop(PROVIDER_OPTION, None)
        params.pop("password", None)
        target.check(final_params("", params))
        params["password"] = target.provider.token()
        return _TokenKwargs(params, target.provider)

    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
        """Connect; a token the server refused is forgotten and the error explained."""
        target = self._target()
        token = Secret(conn_params.get("password"))
        params = final_params("", {k: v for k, v in conn_params.items() if k != "password"})
        target.check(params)
        base_connect = super().get_new_connection
        try:
            if self.pool:  # the pool's connection class chooses the CA file (sync_class)
                return base_connect(conn_params)
            return open_verified(lambda root: base_connect(with_root(conn_params, root)), params)
        except psycopg.OperationalError as exc:
            error = explain(exc, target.provider, token, conn_params)
            if error is exc:
                raise
            raise error from exc
