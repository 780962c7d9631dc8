"""A local proxy that gives any PostgreSQL client IAM-authenticated sessions.

``iampg proxy`` on the command line, :class:`Proxy` in Python. Not imported by
``import iampg``; its names load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._proxy import ClientTls, Proxy, ProxyStats, SessionInfo

__all__ = ["ClientTls", "Proxy", "ProxyStats", "SessionInfo"]


def __getattr__(name: str) -> object:
    if name in __all__:
        value = getattr(importlib.import_module("._proxy", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
