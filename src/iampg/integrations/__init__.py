"""Thin glue for SQLAlchemy, asyncpg, Django and psycopg2; each submodule imports its own.

Importing :mod:`iampg` never imports this package, and importing this package imports no
framework: use ``iampg.integrations.sqlalchemy``, ``iampg.integrations.asyncpg``,
``iampg.integrations.django`` or ``iampg.integrations.psycopg2`` (each needs the extra of the
same name, e.g. ``pip install "iampg[sqlalchemy]"``).
"""

from __future__ import annotations

from typing import TypeAlias

from iampg._connecting import resolve
from iampg._endpoint import Endpoint
from iampg._tokens import TokenProvider

__all__: list[str] = []

EndpointOrProvider: TypeAlias = Endpoint | str | TokenProvider
"""What every integration accepts: an endpoint (or anything :meth:`Endpoint.parse` takes),
for which a provider is made, or the :class:`iampg.TokenProvider` to share."""


def _resolve(target: EndpointOrProvider) -> tuple[Endpoint, TokenProvider]:
    """Return the endpoint to dial and the provider that signs for it.

    Raises:
        ConfigurationError: ``target`` is not a valid endpoint.
    """
    if isinstance(target, TokenProvider):
        return target.endpoint, target
    return resolve(target, None)
